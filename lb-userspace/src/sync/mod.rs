//! Keeping the maps equal to the desired state: the plan of writes in a
//! reader-safe order (`differ`), writing it (`map_writer`, `map_batch`,
//! each family's maps through `family_maps`),
//! full and incremental syncs (`programmer`), Maglev tables beside the
//! slots (`maglev_tables`), and the independent check of the pinned maps
//! against the desired state (`checker`).

pub mod checker;
pub mod differ;
pub mod family_maps;
pub mod maglev_tables;
pub(crate) mod map_batch;
pub mod map_writer;
pub mod programmer;
#[cfg(test)]
mod sync_proptest;
