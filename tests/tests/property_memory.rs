//! Property suite on the in-memory backends: random histories with faults,
//! crashes, concurrency and recoveries against a pure model. At least 2,048
//! cases by default; `PROPTEST_CASES` raises (or lowers) it.

use proptest::prelude::*;
use proptest::test_runner::Config;
use tandem_adapters::memory::{InMemoryMetadataRepo, InMemoryVectorIndex};
use tandem_core::Distance;
use tandem_tests::harness::DIM;
use tandem_tests::property::{property_config, run_history_with, step};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048)
}

proptest! {
    #![proptest_config(Config { cases: cases(), failure_persistence: None, ..Config::default() })]

    #[test]
    fn random_histories_keep_every_invariant(steps in prop::collection::vec(step(), 1..10)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        let result = rt.block_on(run_history_with(
            || async { (InMemoryMetadataRepo::new(), InMemoryVectorIndex::new(DIM, Distance::Cosine)) },
            Some(InMemoryVectorIndex::new),
            property_config(),
            steps,
            None,
        ));
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}
