//! The demo's sample catalog: items in several scopes, each with a few text
//! records (title, description, reviews, ...), deterministic for a seed.

use serde_json::{Value, json};
use tandem_core::{NewRecord, RecordId, Scope};

use crate::embed::hash_embedding;

/// The scopes (catalogs) of the demo, each with words of its own.
const SCOPES: [(&str, &[&str]); 5] = [
    (
        "books",
        &[
            "novel",
            "mystery",
            "poetry",
            "history",
            "biography",
            "fantasy",
            "atlas",
            "essays",
            "thriller",
            "memoir",
        ],
    ),
    (
        "music",
        &[
            "vinyl", "jazz", "symphony", "guitar", "piano", "album", "concert", "blues", "opera",
            "folk",
        ],
    ),
    (
        "films",
        &[
            "documentary",
            "western",
            "comedy",
            "drama",
            "noir",
            "animation",
            "trilogy",
            "director",
            "cinema",
            "remaster",
        ],
    ),
    (
        "garden",
        &[
            "seeds",
            "shovel",
            "compost",
            "roses",
            "hose",
            "planter",
            "tulips",
            "pruner",
            "soil",
            "greenhouse",
        ],
    ),
    (
        "kitchen",
        &[
            "knife",
            "skillet",
            "kettle",
            "blender",
            "teapot",
            "whisk",
            "cast-iron",
            "spatula",
            "grinder",
            "oven",
        ],
    ),
];

const ADJECTIVES: [&str; 12] = [
    "classic",
    "vintage",
    "modern",
    "compact",
    "deluxe",
    "handmade",
    "rare",
    "signed",
    "durable",
    "illustrated",
    "portable",
    "limited",
];

const KINDS: [&str; 6] = ["title", "description", "review", "review", "specs", "faq"];

const REVIEW_WORDS: [&str; 10] = [
    "excellent",
    "disappointing",
    "solid",
    "beautiful",
    "overpriced",
    "sturdy",
    "wonderful",
    "fragile",
    "recommended",
    "average",
];

/// One generated record.
#[derive(Clone, Debug)]
pub struct DemoRecord {
    /// Its id.
    pub id: RecordId,
    /// Its scope.
    pub scope: &'static str,
    /// The item it describes (`books-0007`).
    pub item: String,
    /// Its text.
    pub content: String,
    /// Its metadata.
    pub metadata: Value,
    /// Its hash embedding.
    pub vector: Vec<f32>,
}

impl DemoRecord {
    /// The record as the coordinator takes it.
    pub fn to_new(&self) -> NewRecord {
        NewRecord {
            id: Some(self.id),
            scope: Scope::new(self.scope),
            content: self.content.clone(),
            metadata: self.metadata.clone(),
            vector: self.vector.clone(),
        }
    }

    /// The record with revised text and its new embedding ("re-embedded").
    pub fn revised(&self, dimension: usize) -> DemoRecord {
        let content = format!("{} (revised edition, updated listing)", self.content);
        let vector = hash_embedding(&content, dimension).unwrap_or_else(|| self.vector.clone());
        let mut metadata = self.metadata.clone();
        if let Some(m) = metadata.as_object_mut() {
            m.insert("revision".into(), json!(2));
        }
        DemoRecord {
            content,
            vector,
            metadata,
            ..self.clone()
        }
    }
}

/// The names of the demo's scopes.
pub fn scopes() -> Vec<&'static str> {
    SCOPES.iter().map(|(s, _)| *s).collect()
}

/// Records per item.
pub const RECORDS_PER_ITEM: usize = KINDS.len();

/// `n` records: item `j` has [`RECORDS_PER_ITEM`] records and lives in scope
/// `j mod 5`; ids, texts and metadata follow from `seed`.
pub fn generate(n: usize, seed: u64, dimension: usize) -> Vec<DemoRecord> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|i| {
            let item_no = i / RECORDS_PER_ITEM;
            let kind = KINDS[i % RECORDS_PER_ITEM];
            let (scope, words) = SCOPES[item_no % SCOPES.len()];
            let item = format!("{scope}-{:04}", item_no / SCOPES.len());
            let mut bytes = [0u8; 16];
            rng.fill(&mut bytes);
            let id = RecordId(uuid::Builder::from_random_bytes(bytes).into_uuid());
            // The item's own words come from its number, so that all its
            // records share them; the rest varies per record.
            let w1 = words[item_no % words.len()];
            let w2 = words[(item_no / words.len() + 3) % words.len()];
            let adj = ADJECTIVES[item_no % ADJECTIVES.len()];
            let content = match kind {
                "title" => format!("{adj} {w1} {w2} — {item}"),
                "description" => format!(
                    "A {adj} {w1} with {} {w2} details, item {item}",
                    ADJECTIVES[rng.usize(..ADJECTIVES.len())]
                ),
                "review" => format!(
                    "{} {w1}: {} and {} {w2}",
                    REVIEW_WORDS[rng.usize(..REVIEW_WORDS.len())],
                    REVIEW_WORDS[rng.usize(..REVIEW_WORDS.len())],
                    ADJECTIVES[rng.usize(..ADJECTIVES.len())]
                ),
                "specs" => format!(
                    "{w1} specifications: {} cm, {} g, {adj} finish",
                    rng.u32(5..120),
                    rng.u32(100..5000)
                ),
                _ => format!("Questions about the {adj} {w1}: shipping, returns and care of {w2}"),
            };
            let vector = hash_embedding(&content, dimension).unwrap_or_else(|| {
                // Every template has words; keep a valid vector regardless.
                let mut v = vec![0.0; dimension];
                v[0] = 1.0;
                v
            });
            let metadata = json!({
                "item": item,
                "kind": kind,
                "price": (rng.u32(100..20_000) as f64) / 100.0,
                "in_stock": rng.bool(),
            });
            DemoRecord {
                id,
                scope,
                item,
                content,
                metadata,
                vector,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_spread_over_scopes() {
        let a = generate(300, 7, 32);
        let b = generate(300, 7, 32);
        assert_eq!(a.len(), 300);
        assert!(
            a.iter()
                .zip(&b)
                .all(|(x, y)| x.id == y.id && x.content == y.content)
        );
        let c = generate(300, 8, 32);
        assert_ne!(a[0].id, c[0].id);
        for s in scopes() {
            assert!(a.iter().filter(|r| r.scope == s).count() >= 50, "{s}");
        }
        let ids: std::collections::HashSet<_> = a.iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), 300);
        // Every record of an item shares its scope and item key.
        let item = &a[0].item;
        let of_item: Vec<_> = a.iter().filter(|r| &r.item == item).collect();
        assert_eq!(of_item.len(), RECORDS_PER_ITEM);
        assert!(of_item.iter().all(|r| r.metadata["item"] == json!(item)));
    }

    #[test]
    fn a_revision_changes_text_and_vector_but_not_identity() {
        let r = &generate(1, 1, 32)[0];
        let v = r.revised(32);
        assert_eq!((v.id, v.scope, &v.item), (r.id, r.scope, &r.item));
        assert_ne!(v.content, r.content);
        assert_ne!(v.vector, r.vector);
    }
}
