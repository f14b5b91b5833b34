// pages.wgsl: the paged KV pool's layout, stated once. Every kernel that
// reads or writes pages has this file joined in front of its source (Rust:
// ops::pages, which mirrors these functions for the CPU twins). The
// including kernel binds `tables` (page indices) and a uniform `p` with
// page_size, page_words and dw.
//
// A page of `page_size` slots is `page_words` u32 words:
//   [page_size][dw] keys, [page_size][dw] values, [page_size] positions
// dw = head_dim, or head_dim / 2 where two f16 share a word (low half first).
// A stored head's descriptor is {offset of its block table in `tables`, its
// length in slots}; slot t lives in page tables[offset + t / page_size] at
// index t % page_size.

struct PageGeom {
    page_size: u32,
    page_words: u32,
    dw: u32,
}

fn geom() -> PageGeom {
    return PageGeom(p.page_size, p.page_words, p.dw);
}

// First word of pool page `page`.
fn page_start(g: PageGeom, page: u32) -> u32 {
    return page * g.page_words;
}

// First word of the page that holds slot t of the block table at `table`.
fn slot_page(g: PageGeom, table: u32, t: u32) -> u32 {
    return page_start(g, tables[table + t / g.page_size]);
}

// Within a page: slot i's key, value (dw words each) and position word.
fn key_at(g: PageGeom, i: u32) -> u32 {
    return i * g.dw;
}

fn value_at(g: PageGeom, i: u32) -> u32 {
    return (g.page_size + i) * g.dw;
}

fn position_at(g: PageGeom, i: u32) -> u32 {
    return 2u * g.page_size * g.dw + i;
}

// From a slot's key word to its value word.
fn value_offset(g: PageGeom) -> u32 {
    return g.page_size * g.dw;
}
