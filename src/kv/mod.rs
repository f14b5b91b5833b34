//! The paged KV cache. `pool` and `table` are the policy side (which pages
//! belong to which sequence, layer and head), with no GPU code; `paged` holds
//! the GPU pool and the kernels that read and write it through the tables.

pub mod compression;
pub mod paged;
pub mod pool;
pub mod table;

pub use pool::{Exhausted, PageAllocator, PageId};
pub use table::{HeadTable, NewPage, SeqTables};
