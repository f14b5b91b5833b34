//! The page allocator of the KV pool (host side, no GPU code).
//!
//! A page holds `page_size` slots of K and V for one (layer, stored head) of
//! one sequence. Pages live in shards (one GPU buffer each, so a shard fits a
//! storage binding); layer `l` takes its pages from shard `l % shards`, so an
//! attention dispatch, which serves one layer, binds one shard. With one shard
//! (the common case) the pool is fully shared. Allocation and release are O(1)
//! (a free stack per shard).

/// A page id: (shard, index within the shard).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageId {
    pub shard: u32,
    pub index: u32,
}

/// The pool ran out of pages in a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exhausted {
    pub shard: u32,
}

#[derive(Clone, Debug)]
struct Shard {
    free: Vec<u32>,
    pages: u32,
}

/// Free lists and accounting of the pool's pages.
#[derive(Clone, Debug)]
pub struct PageAllocator {
    shards: Vec<Shard>,
    n_layers: usize,
}

impl PageAllocator {
    /// `pages_per_shard[s]` pages in shard `s`; layers map onto shards
    /// round-robin. No shard or no layer is an error.
    pub fn new(pages_per_shard: &[u32], n_layers: usize) -> crate::Result<Self> {
        if pages_per_shard.is_empty() || n_layers == 0 {
            return Err(crate::Error::invalid(
                "KV pool",
                format!(
                    "{} shards for {n_layers} layers: needs at least one of each",
                    pages_per_shard.len()
                ),
            ));
        }
        Ok(Self {
            shards: pages_per_shard
                .iter()
                .map(|&pages| Shard {
                    // Popped from the end: low pages are handed out first.
                    free: (0..pages).rev().collect(),
                    pages,
                })
                .collect(),
            n_layers,
        })
    }

    /// The shard serving `layer` (layers past the model's wrap around; the
    /// tables never ask for one).
    pub fn shard_of_layer(&self, layer: usize) -> u32 {
        (layer % self.shards.len()) as u32
    }

    pub fn n_shards(&self) -> usize {
        self.shards.len()
    }

    /// A page for `layer`, or `Exhausted`.
    pub fn alloc(&mut self, layer: usize) -> Result<PageId, Exhausted> {
        let shard = self.shard_of_layer(layer);
        match self.shards[shard as usize].free.pop() {
            Some(index) => Ok(PageId { shard, index }),
            None => Err(Exhausted { shard }),
        }
    }

    /// Returns a page. Pages come only from [`PageAllocator::alloc`] and go
    /// back once (the tables own them), so a foreign or repeated id is a bug.
    pub fn free(&mut self, page: PageId) {
        let s = &mut self.shards[page.shard as usize];
        debug_assert!(
            page.index < s.pages && !s.free.contains(&page.index),
            "double free of {page:?}"
        );
        s.free.push(page.index);
    }

    /// Free pages in the shard serving `layer`.
    pub fn available_for_layer(&self, layer: usize) -> usize {
        self.shards[self.shard_of_layer(layer) as usize].free.len()
    }

    /// Free pages in each shard.
    pub fn available(&self) -> Vec<usize> {
        self.shards.iter().map(|s| s.free.len()).collect()
    }

    pub fn total_pages(&self) -> usize {
        self.shards.iter().map(|s| s.pages as usize).sum()
    }

    pub fn pages_in_use(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.pages as usize - s.free.len())
            .sum()
    }

    fn need_per_shard(&self, per_layer: impl Fn(usize) -> usize) -> Vec<usize> {
        let mut need = vec![0usize; self.shards.len()];
        for l in 0..self.n_layers {
            need[self.shard_of_layer(l) as usize] += per_layer(l);
        }
        need
    }

    /// Would `per_layer(l)` more pages for every layer `l` fit right now?
    pub fn fits(&self, per_layer: impl Fn(usize) -> usize) -> bool {
        let need = self.need_per_shard(per_layer);
        need.iter()
            .zip(&self.shards)
            .all(|(n, s)| *n <= s.free.len())
    }

    /// Would they fit in the whole pool, were it empty?
    pub fn fits_when_empty(&self, per_layer: impl Fn(usize) -> usize) -> bool {
        let need = self.need_per_shard(per_layer);
        need.iter()
            .zip(&self.shards)
            .all(|(n, s)| *n <= s.pages as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_and_accounting() {
        let mut a = PageAllocator::new(&[3], 2).unwrap();
        assert_eq!(a.total_pages(), 3);
        let p0 = a.alloc(0).unwrap();
        let p1 = a.alloc(1).unwrap();
        let p2 = a.alloc(0).unwrap();
        assert_eq!((p0.index, p1.index, p2.index), (0, 1, 2));
        assert_eq!(a.pages_in_use(), 3);
        assert_eq!(a.alloc(1), Err(Exhausted { shard: 0 }));
        a.free(p1);
        // The freed page is reused first.
        assert_eq!(a.alloc(0).unwrap(), p1);
        a.free(p0);
        a.free(p1);
        a.free(p2);
        assert_eq!(a.pages_in_use(), 0);
    }

    #[test]
    fn layers_map_onto_shards_round_robin() {
        let mut a = PageAllocator::new(&[2, 1], 3).unwrap();
        assert!(PageAllocator::new(&[], 3).is_err());
        assert!(PageAllocator::new(&[4], 0).is_err());
        assert_eq!(a.alloc(0).unwrap().shard, 0);
        assert_eq!(a.alloc(1).unwrap().shard, 1);
        assert_eq!(a.alloc(2).unwrap().shard, 0);
        assert!(a.alloc(1).is_err(), "shard 1 is full");
        assert!(!a.fits(|l| (l == 0) as usize));
        a.free(PageId { shard: 0, index: 0 });
        assert!(a.fits(|l| (l == 0) as usize));
        assert_eq!(a.available(), vec![1, 0]);
    }
}
