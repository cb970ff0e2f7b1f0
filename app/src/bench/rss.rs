//! Peak resident set of this process (Linux: `VmHWM`, reset per case through
//! `/proc/self/clear_refs`). Elsewhere nothing is reported.

/// Resets the peak to the current resident set, where the kernel allows it.
pub fn reset_peak() {
    // "5" resets the peak RSS counter (Linux ≥ 4.0); harmless if refused.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The peak resident set since the last reset (or the start), in bytes.
pub fn peak() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn peak_grows_with_an_allocation() {
        super::reset_peak();
        let before = super::peak().expect("VmHWM on Linux");
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
        let after = super::peak().unwrap();
        assert!(after >= before + (60 << 20), "{before} -> {after}");
    }
}
