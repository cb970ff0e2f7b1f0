//! The port conformance suites against the in-memory backends, directly and
//! through the fault-injecting wrappers with an empty plan (which must be
//! transparent).

use tandem_adapters::memory::{InMemoryCatalog, InMemoryMetadataRepo, InMemoryVectorIndex};
use tandem_core::testkit::faults::{
    FaultController, FaultyCatalog, FaultyMetadataRepo, FaultyVectorIndex,
};

tandem_core::metadata_repo_conformance!(memory_metadata, async { InMemoryMetadataRepo::new() });

tandem_core::metadata_repo_conformance!(
    memory_metadata_without_vectors,
    async { InMemoryMetadataRepo::without_vectors() },
    keeps_vectors = false
);

tandem_core::vector_index_conformance!(memory_index, |dim, distance| async move {
    InMemoryVectorIndex::new(dim, distance)
});

tandem_core::metadata_repo_conformance!(faulty_memory_metadata, async {
    FaultyMetadataRepo::new(InMemoryMetadataRepo::new(), FaultController::new(0))
});

tandem_core::vector_index_conformance!(faulty_memory_index, |dim, distance| async move {
    FaultyVectorIndex::new(
        InMemoryVectorIndex::new(dim, distance),
        FaultController::new(0),
    )
});

tandem_core::index_catalog_conformance!(memory_catalog, async { InMemoryCatalog::new() });

tandem_core::index_catalog_conformance!(faulty_memory_catalog, async {
    FaultyCatalog::new(InMemoryCatalog::new(), FaultController::new(0))
});
