//! Block tables of one sequence (host side, no GPU code): for every
//! (layer, stored head) the pages holding its slots, in slot order, and the
//! number of slots used. Heads may have different lengths (compression gives
//! them different budgets); plain decoding appends one slot to every head.

use super::pool::{Exhausted, PageAllocator, PageId};

#[derive(Clone, Debug, Default)]
pub struct HeadTable {
    pub pages: Vec<PageId>,
    /// Slots in use (the last page may be partly filled).
    pub len: usize,
}

/// A page a call to [`SeqTables::append`] added: where it sits in which table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewPage {
    pub layer: usize,
    pub head: usize,
    /// Index of the page within the head's table.
    pub slot_page: usize,
    pub page: PageId,
}

#[derive(Clone, Debug)]
pub struct SeqTables {
    pub n_layers: usize,
    pub n_heads: usize,
    pub page_size: usize,
    heads: Vec<HeadTable>,
}

impl SeqTables {
    /// Empty tables; `page_size` must be positive (the pool checks it when built).
    pub fn new(n_layers: usize, n_heads: usize, page_size: usize) -> Self {
        Self {
            n_layers,
            n_heads,
            page_size: page_size.max(1),
            heads: vec![HeadTable::default(); n_layers * n_heads],
        }
    }

    /// Each head's length, layer by layer (`[layer * n_heads + head]`).
    pub fn lens(&self) -> Vec<usize> {
        self.heads.iter().map(|t| t.len).collect()
    }

    /// # Panics
    /// On a layer or head past the tables' (an index, like a slice's).
    pub fn head(&self, layer: usize, head: usize) -> &HeadTable {
        &self.heads[layer * self.n_heads + head]
    }

    pub fn head_mut(&mut self, layer: usize, head: usize) -> &mut HeadTable {
        &mut self.heads[layer * self.n_heads + head]
    }

    /// Pages `layer` needs to grow every head by `n` slots.
    pub fn pages_needed(&self, layer: usize, n: usize) -> usize {
        (0..self.n_heads)
            .map(|h| {
                let t = self.head(layer, h);
                (t.len + n)
                    .div_ceil(self.page_size)
                    .saturating_sub(t.pages.len())
            })
            .sum()
    }

    /// Grows every head of every layer by `n` slots, allocating pages. All or
    /// nothing: on `Exhausted` nothing was allocated or changed.
    pub fn append(
        &mut self,
        n: usize,
        alloc: &mut PageAllocator,
    ) -> Result<Vec<NewPage>, Exhausted> {
        let lens: Vec<usize> = self.heads.iter().map(|t| t.len + n).collect();
        self.grow_to(&lens, alloc)
    }

    /// Pages `layer` needs for its heads to reach `lens` (`[layer * n_heads + head]`).
    pub fn pages_needed_for(&self, layer: usize, lens: &[usize]) -> usize {
        (0..self.n_heads)
            .map(|h| {
                let i = layer * self.n_heads + h;
                lens.get(i)
                    .copied()
                    .unwrap_or(0)
                    .div_ceil(self.page_size)
                    .saturating_sub(self.heads[i].pages.len())
            })
            .sum()
    }

    /// Grows each head to `lens[layer * n_heads + head]` slots (never
    /// shrinks one), allocating pages: restores a swapped-out sequence, or
    /// appends. All or nothing, as [`SeqTables::append`].
    pub fn grow_to(
        &mut self,
        lens: &[usize],
        alloc: &mut PageAllocator,
    ) -> Result<Vec<NewPage>, Exhausted> {
        if !alloc.fits(|l| self.pages_needed_for(l, lens)) {
            let shard = (0..self.n_layers)
                .find(|&l| alloc.available_for_layer(l) < self.pages_needed_for(l, lens))
                .map_or(0, |l| alloc.shard_of_layer(l));
            return Err(Exhausted { shard });
        }
        let mut new = vec![];
        let page_size = self.page_size;
        let n_heads = self.n_heads;
        for layer in 0..self.n_layers {
            for head in 0..n_heads {
                let target = lens.get(layer * n_heads + head).copied().unwrap_or(0);
                let t = self.head_mut(layer, head);
                t.len = t.len.max(target);
                while t.pages.len() * page_size < t.len {
                    // fits() above counted this page; `?` only guards the invariant.
                    let page = alloc.alloc(layer)?;
                    new.push(NewPage {
                        layer,
                        head,
                        slot_page: t.pages.len(),
                        page,
                    });
                    t.pages.push(page);
                }
            }
        }
        Ok(new)
    }

    /// Returns every page to the pool and empties the tables.
    pub fn release(&mut self, alloc: &mut PageAllocator) {
        for t in &mut self.heads {
            for p in t.pages.drain(..) {
                alloc.free(p);
            }
            t.len = 0;
        }
    }

    /// Shortens one head to `len` slots (after compaction moved its kept
    /// slots to the front) and returns the pages past them to the pool; a
    /// `len` past the head's leaves it as it is (truncation never grows).
    pub fn truncate(&mut self, layer: usize, head: usize, len: usize, alloc: &mut PageAllocator) {
        let page_size = self.page_size;
        let t = self.head_mut(layer, head);
        let len = len.min(t.len);
        t.len = len;
        while t.pages.len() > len.div_ceil(page_size) {
            if let Some(page) = t.pages.pop() {
                alloc.free(page);
            }
        }
    }

    /// Slots of the longest head.
    pub fn max_len(&self) -> usize {
        self.heads.iter().map(|t| t.len).max().unwrap_or(0)
    }

    pub fn pages_in_use(&self) -> usize {
        self.heads.iter().map(|t| t.pages.len()).sum()
    }

    /// The most slots any one head holds.
    pub fn max_head_len(&self) -> usize {
        self.heads.iter().map(|t| t.len).max().unwrap_or(0)
    }

    /// Slots held in each layer (summed over its heads).
    pub fn slots_per_layer(&self) -> Vec<usize> {
        (0..self.n_layers)
            .map(|l| (0..self.n_heads).map(|h| self.head(l, h).len).sum())
            .collect()
    }

    /// Slots each stored head holds, `[layer][head]`.
    pub fn slots_per_head(&self) -> Vec<Vec<usize>> {
        (0..self.n_layers)
            .map(|l| (0..self.n_heads).map(|h| self.head(l, h).len).collect())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_allocates_pages_as_slots_cross_page_boundaries() {
        let mut alloc = PageAllocator::new(&[100], 2).unwrap();
        let mut t = SeqTables::new(2, 3, 4);
        let new = t.append(5, &mut alloc).unwrap();
        assert_eq!(new.len(), 2 * 3 * 2, "5 slots = 2 pages per head");
        assert_eq!(t.head(1, 2).len, 5);
        assert!(
            t.append(3, &mut alloc).unwrap().is_empty(),
            "8 slots still fit 2 pages"
        );
        assert_eq!(t.append(1, &mut alloc).unwrap().len(), 6);
        assert_eq!(t.pages_in_use(), 18);
        assert_eq!(alloc.pages_in_use(), 18);
        t.release(&mut alloc);
        assert_eq!(alloc.pages_in_use(), 0);
        assert_eq!(t.head(0, 0).len, 0);
    }

    #[test]
    fn truncate_frees_the_pages_past_the_new_length() {
        let mut alloc = PageAllocator::new(&[100], 1).unwrap();
        let mut t = SeqTables::new(1, 2, 4);
        t.append(13, &mut alloc).unwrap(); // 4 pages per head
        t.truncate(0, 1, 5, &mut alloc);
        assert_eq!(t.head(0, 1).pages.len(), 2);
        assert_eq!(t.head(0, 1).len, 5);
        assert_eq!(
            t.head(0, 0).pages.len(),
            4,
            "the other head keeps its pages"
        );
        assert_eq!(alloc.pages_in_use(), 6);
        t.truncate(0, 0, 0, &mut alloc);
        assert_eq!(alloc.pages_in_use(), 2);
        // Growing again appends to each head from its own length.
        t.append(1, &mut alloc).unwrap();
        assert_eq!((t.head(0, 0).len, t.head(0, 1).len), (1, 6));
    }

    #[test]
    fn append_is_all_or_nothing_when_the_pool_is_short() {
        let mut alloc = PageAllocator::new(&[5], 2).unwrap();
        let mut t = SeqTables::new(2, 2, 4);
        t.append(4, &mut alloc).unwrap(); // 4 pages
        let before = alloc.pages_in_use();
        assert!(
            t.append(1, &mut alloc).is_err(),
            "needs 4 more pages, 1 left"
        );
        assert_eq!(alloc.pages_in_use(), before);
        assert_eq!(t.head(0, 0).len, 4);
    }

    #[test]
    fn restoring_lengths_and_odd_arguments_never_panic() {
        let mut alloc = PageAllocator::new(&[40], 2).unwrap();
        // A page size of 0 is taken as 1 (the pool refuses it before this).
        let t0 = SeqTables::new(2, 2, 0);
        assert_eq!(t0.page_size, 1);
        let mut t = SeqTables::new(2, 2, 4);
        // Per-head lengths as a swapped-out sequence had them.
        let lens = [5, 0, 9, 4];
        let new = t.grow_to(&lens, &mut alloc).unwrap();
        assert_eq!(new.len(), 2 + 3 + 1);
        assert_eq!(t.lens(), lens.to_vec());
        assert_eq!(t.max_len(), 9);
        // All or nothing when the pool is short; never shrinks a head.
        let before = alloc.pages_in_use();
        assert!(t.grow_to(&[400, 0, 0, 0], &mut alloc).is_err());
        assert_eq!((alloc.pages_in_use(), t.lens()), (before, lens.to_vec()));
        assert!(t.grow_to(&[1, 0, 1, 1], &mut alloc).unwrap().is_empty());
        assert_eq!(t.lens(), lens.to_vec());
        // Truncating past a head's length leaves it.
        t.truncate(0, 1, 50, &mut alloc);
        assert_eq!(t.head(0, 1).len, 0);
        t.release(&mut alloc);
        assert_eq!(alloc.pages_in_use(), 0);
    }
}
