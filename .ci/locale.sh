#!/usr/bin/env bash
# Makes the German locale available to the local PostgreSQL server, so that the
# error classifier suite (tests/tests/postgres_errors.rs) also runs with the
# server's messages in German (`lc_messages = 'de_DE.UTF-8'` per session).
#
# Idempotent; run as root on the machine the server runs on, before or after
# the server starts: no restart is needed. PostgreSQL checks `lc_messages`
# when a session sets it, by calling setlocale() in that session's backend.
# A backend is forked from a postmaster that has glibc's locale archive
# (/usr/lib/locale/locale-archive) mapped as it was when the server started,
# so a locale added to the archive later (`locale-gen`) is invisible to it
# until a restart ("invalid value for parameter lc_messages"). A locale
# compiled to its own directory (`localedef --no-archive`) is looked up on
# disk when the archive lacks it, so the running server sees it at once.
set -euo pipefail

dir=/usr/lib/locale/de_DE.utf8

if [ ! -e "$dir/LC_MESSAGES" ]; then
  # localedef comes with libc-bin; the locale sources with `locales`.
  if [ ! -e /usr/share/i18n/locales/de_DE ] || [ ! -e /usr/share/i18n/charmaps/UTF-8.gz ]; then
    echo "locale: installing the locales package"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq locales >/dev/null
  fi
  echo "locale: generating de_DE.UTF-8 in $dir"
  # localedef exits non-zero on mere warnings too: the check below decides.
  localedef --no-archive -i de_DE -f UTF-8 de_DE.UTF-8 || true
fi
[ -e "$dir/LC_MESSAGES" ] || { echo "locale: $dir was not created" >&2; exit 1; }

# PostgreSQL translates only with its own German message catalog (Debian's
# postgresql-NN package ships it); without it the messages stay English, and
# the suite fails saying so.
if ! ls /usr/share/locale/de/LC_MESSAGES/postgres-*.mo >/dev/null 2>&1; then
  echo "locale: warning: no PostgreSQL German message catalog in /usr/share/locale/de/LC_MESSAGES" >&2
fi
echo "locale: de_DE.UTF-8 available"
