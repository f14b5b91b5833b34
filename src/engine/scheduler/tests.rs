//! The scheduler's decisions, on the host (no GPU).

use super::*;
use crate::engine::sequence::Swapped;
use crate::kv::paged::HostKv;

const PAGE: usize = 4;

use crate::kv::compression::Method;

fn none() -> CompressConfig {
    CompressConfig::new(Method::None, 0)
}

impl Scheduler {
    fn enqueue_plain(&mut self, req: Request) -> RequestId {
        self.enqueue(req, none())
    }
}

/// A scheduler over one layer with one stored head, pages of 4 slots.
fn scheduler(lanes: usize, on_exhaustion: Exhaustion, chain: usize) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        lanes,
        on_exhaustion,
        decode_chain: chain,
        capacity: 64,
        vocab_size: 100,
        max_position_embeddings: 64,
        n_layers: 1,
        n_heads: 1,
        page_size: PAGE,
        page_bytes: 64,
        pool_advice: "raise --kv-pool-mb".into(),
    })
}

fn pool(pages: u32) -> PageAllocator {
    PageAllocator::new(&[pages], 1).unwrap()
}

fn request(prompt_len: usize, max_tokens: usize) -> Request {
    Request::greedy((0..prompt_len as u32).collect(), max_tokens)
}

/// Admits what can start and "prefills" it on the host: its tables take
/// the prompt, as the engine's start does.
fn admit_all(s: &mut Scheduler, alloc: &mut PageAllocator, events: &mut Vec<Event>) {
    while let Some(mut seq) = s.next_admission(alloc, events) {
        let n = seq.tokens.len();
        seq.tables.append(n, alloc).unwrap();
        s.accept(seq, 7, alloc, events);
    }
}

fn ids(s: &Scheduler) -> Vec<RequestId> {
    s.running.iter().map(|q| q.id).collect()
}

#[test]
fn admission_is_first_come_first_served_within_the_lanes() {
    let mut s = scheduler(2, Exhaustion::Swap, 1);
    let mut alloc = pool(100);
    let mut ev = vec![];
    for _ in 0..3 {
        s.enqueue_plain(request(5, 10));
    }
    admit_all(&mut s, &mut alloc, &mut ev);
    assert_eq!(ids(&s), [0, 1]);
    assert_eq!(s.waiting.len(), 1);
    // Two lanes, distinct.
    assert_ne!(s.running[0].lane, s.running[1].lane);
    // The first finishes: its lane goes to the third.
    s.cancel(0, &mut alloc);
    admit_all(&mut s, &mut alloc, &mut ev);
    assert_eq!(ids(&s), [1, 2]);
}

#[test]
fn admission_leaves_room_for_the_running_sequences_next_slot() {
    let mut s = scheduler(4, Exhaustion::Swap, 1);
    // 3 pages: request 0 (8 tokens, 2 pages, full) runs; request 1 needs
    // 1 page plus 1 for request 0's next slot plus one of headroom: waits.
    let mut alloc = pool(3);
    let mut ev = vec![];
    s.enqueue_plain(request(8, 10));
    s.enqueue_plain(request(2, 10));
    admit_all(&mut s, &mut alloc, &mut ev);
    assert_eq!(ids(&s), [0]);
    assert_eq!(s.waiting.len(), 1);
    // Alone, the same request would start.
    let mut alone = scheduler(4, Exhaustion::Swap, 1);
    alone.enqueue_plain(request(2, 10));
    admit_all(&mut alone, &mut pool(1), &mut ev);
    assert_eq!(ids(&alone), [0]);
}

#[test]
fn requests_the_empty_pool_cannot_hold_fail_and_zero_token_ones_finish() {
    let mut s = scheduler(2, Exhaustion::Swap, 1);
    let mut alloc = pool(2);
    let mut ev = vec![];
    s.enqueue_plain(request(9, 10)); // 3 pages of 4 > 2
    s.enqueue_plain(request(3, 0));
    s.enqueue_plain(request(3, 10));
    admit_all(&mut s, &mut alloc, &mut ev);
    assert!(
        matches!(&ev[0], Event::Failed { id: 0, error } if error.contains("3 KV pages") && error.contains("--kv-pool-mb")),
        "{ev:?}"
    );
    assert_eq!(
        ev[1],
        Event::Finished {
            id: 1,
            reason: StopReason::MaxTokens
        }
    );
    assert_eq!(ids(&s), [2]);
    assert_eq!(alloc.pages_in_use(), 1);
}

#[test]
fn exhaustion_preempts_the_latest_arrived_other_sequence() {
    for mode in [Exhaustion::Swap, Exhaustion::Recompute] {
        let mut s = scheduler(3, mode, 1);
        let mut alloc = pool(6);
        let mut ev = vec![];
        for _ in 0..3 {
            s.enqueue_plain(request(4, 50));
        }
        admit_all(&mut s, &mut alloc, &mut ev);
        assert_eq!(ids(&s), [0, 1, 2]);
        // Each holds one full page (4 tokens); the first growth takes
        // 3 more pages of the 3 left.
        let g = s.grow(&mut alloc, &mut ev);
        assert!(g.preempted.is_empty());
        assert_eq!(g.new_pages.len(), 3);
        for seq in s.running.iter_mut() {
            seq.tokens.push(1);
            seq.tables.append(3, &mut alloc).unwrap(); // fill the pages: 8 slots
        }
        ev.clear();
        // Sequence 0 needs a page, none free: sequence 2 (latest) goes.
        let g = s.grow(&mut alloc, &mut ev);
        assert_eq!(ev, [Event::Preempted { id: 2 }], "{mode:?}");
        assert_eq!(g.preempted.len(), 1);
        let p = &g.preempted[0];
        assert_eq!(p.seq.id, 2);
        assert_eq!(p.seq.lane, NO_LANE);
        assert_eq!(p.seq.tables.pages_in_use(), 0, "its pages are released");
        match mode {
            // The snapshot still names the 2 pages to copy out.
            Exhaustion::Swap => assert_eq!(p.swap_from.as_ref().unwrap().0.pages_in_use(), 2),
            _ => {
                assert!(p.swap_from.is_none());
                assert!(matches!(&p.seq.parked, Parked::Replay { held } if held == &[2]));
            }
        }
        assert_eq!(ids(&s), [0, 1]);
        // Both survivors grew by one slot, on the freed pages.
        assert!(
            s.running.iter().all(|q| q.tables.max_len() == 9),
            "{mode:?}"
        );
        assert_eq!(s.preemptions, 1);
    }
}

#[test]
fn a_victim_that_already_grew_gives_its_slot_back() {
    let mut s = scheduler(2, Exhaustion::Swap, 1);
    let mut alloc = pool(4);
    let mut ev = vec![];
    s.enqueue_plain(request(4, 50)); // id 0
    s.enqueue_plain(request(3, 50)); // id 1
    admit_all(&mut s, &mut alloc, &mut ev);
    assert_eq!(ids(&s), [0, 1]);
    // Put the later arrival first in the rows: it grows (in its page),
    // then the earlier one cannot, and the later one, already grown, is
    // the victim.
    s.running.swap(0, 1);
    for seq in s.running.iter_mut() {
        seq.tokens.push(1);
    }
    s.running[1].tables.append(8, &mut alloc).unwrap(); // id 0: 12 slots, 3 pages
    assert_eq!(alloc.available_for_layer(0), 0);
    ev.clear();
    let g = s.grow(&mut alloc, &mut ev);
    assert_eq!(ev, [Event::Preempted { id: 1 }]);
    let (snapshot, _) = g.preempted[0].swap_from.as_ref().unwrap();
    assert_eq!(snapshot.max_len(), 3, "the grown slot was given back");
    assert_eq!(
        g.new_pages.len(),
        1,
        "only the survivor's pages are written"
    );
    assert_eq!(g.new_pages[0].0, 0);
    assert_eq!(ids(&s), [0]);
    assert_eq!(s.running[0].tables.max_len(), 13);
}

#[test]
fn reject_fails_the_sequence_that_cannot_grow() {
    let mut s = scheduler(2, Exhaustion::Reject, 1);
    let mut alloc = pool(4);
    let mut ev = vec![];
    s.enqueue_plain(request(4, 50));
    s.enqueue_plain(request(3, 50));
    admit_all(&mut s, &mut alloc, &mut ev);
    assert_eq!(ids(&s), [0, 1]);
    s.running[0].tables.append(4, &mut alloc).unwrap(); // 8 slots, 2 pages
    s.running[1].tables.append(5, &mut alloc).unwrap(); // 8 slots, 2 pages
    ev.clear();
    s.grow(&mut alloc, &mut ev);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(
        matches!(&ev[0], Event::Failed { id: 0, error } if error.contains("exhausted") && error.contains("--on-exhaustion swap")),
        "{ev:?}"
    );
    // Its pages went to the other, which grew.
    assert_eq!(ids(&s), [1]);
    assert_eq!(s.running[0].tables.max_len(), 9);
    // Alone, swap has nobody to preempt: it fails too.
    let mut s = scheduler(1, Exhaustion::Swap, 1);
    let mut alloc = pool(1);
    s.enqueue_plain(request(4, 50));
    admit_all(&mut s, &mut alloc, &mut ev);
    ev.clear();
    s.grow(&mut alloc, &mut ev);
    assert!(matches!(&ev[0], Event::Failed { id: 0, .. }));
    assert_eq!(
        alloc.pages_in_use(),
        0,
        "a failed sequence returns its pages"
    );
}

#[test]
fn a_swapped_sequence_is_readmitted_first_with_its_own_page_count() {
    let mut s = scheduler(2, Exhaustion::Swap, 1);
    let mut alloc = pool(10);
    let mut ev = vec![];
    s.enqueue_plain(request(2, 50));
    let mut seq = Sequence::new(9, request(2, 50), SeqTables::new(1, 1, PAGE), none());
    seq.parked = Parked::Swapped(Box::new(Swapped {
        kv: HostKv {
            lens: vec![13],
            words: vec![],
        },
        lane: None,
    }));
    s.park(seq);
    assert_eq!(s.admission_need(&s.waiting[0]), [4]);
    let first = s.next_admission(&mut alloc, &mut ev).unwrap();
    assert_eq!(first.id, 9);
}

#[test]
fn tokens_end_a_sequence_at_a_stop_id_max_tokens_or_the_context() {
    let s = scheduler(1, Exhaustion::Swap, 1);
    let mut ev = vec![];
    let mut seq = Sequence::new(0, request(3, 2), SeqTables::new(1, 1, PAGE), none());
    seq.req.stop_ids = vec![42];
    assert!(matches!(
        s.record(&mut seq, 5, 0, &mut ev),
        Outcome::Running
    ));
    assert!(matches!(s.record(&mut seq, 6, 0, &mut ev), Outcome::Done));
    assert_eq!(
        ev.last(),
        Some(&Event::Finished {
            id: 0,
            reason: StopReason::MaxTokens
        })
    );
    let mut seq = Sequence::new(1, request(3, 9), SeqTables::new(1, 1, PAGE), none());
    seq.req.stop_ids = vec![42];
    assert!(matches!(s.record(&mut seq, 42, 0, &mut ev), Outcome::Done));
    assert_eq!(seq.tokens.last(), Some(&42), "the stop token is kept");
    // A head at capacity - 1 slots: the next token has no slot.
    let mut alloc = pool(100);
    let mut seq = Sequence::new(2, request(3, 99), SeqTables::new(1, 1, PAGE), none());
    seq.tables.append(62, &mut alloc).unwrap();
    assert!(matches!(
        s.record(&mut seq, 1, 0, &mut ev),
        Outcome::Running
    ));
    seq.tables.append(1, &mut alloc).unwrap();
    assert!(matches!(s.record(&mut seq, 1, 0, &mut ev), Outcome::Done));
    assert_eq!(
        ev.last(),
        Some(&Event::Finished {
            id: 2,
            reason: StopReason::Context
        })
    );
    // The sampler's NO_TOKEN (non-finite logits) fails it, no Token event.
    let n = ev.len();
    assert!(matches!(
        s.record(&mut seq, u32::MAX, 0, &mut ev),
        Outcome::Failed(Error::NonFiniteLogits { .. })
    ));
    assert_eq!(ev.len(), n);
}

#[test]
fn chains_stop_at_limits_triggers_and_waiting_requests() {
    let mut s = scheduler(4, Exhaustion::Swap, 16);
    let mut alloc = pool(100);
    let mut ev = vec![];
    s.enqueue_plain(request(5, 40));
    s.enqueue_plain(request(5, 6));
    admit_all(&mut s, &mut alloc, &mut ev);
    let none = |_: &Sequence| None;
    // Request 1 has 5 tokens left (one generated at admission).
    assert_eq!(s.chain_len(false, none), 5);
    assert_eq!(s.chain_len(true, none), 1, "capturing or profiling");
    // A trigger 2 steps after the pending token's: the chain ends on it.
    assert_eq!(s.chain_len(false, |_| Some(2)), 3);
    assert_eq!(s.chain_len(false, |_| Some(0)), 1);
    s.enqueue_plain(request(5, 6));
    assert_eq!(s.chain_len(false, none), 1, "someone waits");
    // Growing a chain takes k slots from everyone, or nothing.
    s.waiting.clear();
    let before = alloc.pages_in_use();
    let pages = s.grow_chain(4, &mut alloc).unwrap().unwrap();
    assert_eq!(pages.len(), 2);
    assert!(s.running.iter().all(|q| q.tables.max_len() == 9));
    assert_eq!(alloc.pages_in_use(), before + 2);
    let mut tight = pool(2);
    let mut t = scheduler(2, Exhaustion::Swap, 16);
    t.enqueue_plain(request(4, 40));
    admit_all(&mut t, &mut tight, &mut ev);
    assert!(t.grow_chain(8, &mut tight).unwrap().is_none());
    assert_eq!(t.running[0].tables.max_len(), 4, "nothing changed");
}

#[test]
fn a_report_keeps_the_peak_pages_past_a_truncation_and_is_taken_once() {
    let mut s = scheduler(1, Exhaustion::Swap, 1);
    let mut alloc = pool(100);
    let mut ev = vec![];
    s.enqueue_plain(request(10, 20)); // 3 pages of 4
    admit_all(&mut s, &mut alloc, &mut ev);
    let seq = &mut s.running[0];
    seq.tables.append(6, &mut alloc).unwrap(); // 16 slots: 4 pages
    // A "compression pass" notes the peak, then keeps 5 slots (2 pages).
    seq.note_peak();
    seq.tables.truncate(0, 0, 5, &mut alloc);
    seq.passes += 1;
    seq.slots_dropped += 11;
    s.cancel(0, &mut alloc);
    assert_eq!(alloc.pages_in_use(), 0);
    let r = s.report(0).expect("a report for the cancelled request");
    assert_eq!(r.slots_per_layer, [5]);
    assert_eq!(r.slots_per_head, [[5]]);
    assert_eq!((r.compression_passes, r.slots_dropped), (1, 11));
    assert_eq!((r.peak_kv_pages, r.peak_kv_bytes), (4, 4 * 64));
    assert_eq!(
        r.peak_slots_per_head, 16,
        "the head held 16 slots before the pass"
    );
    assert!(s.take_report(0).is_some());
    assert!(s.report(0).is_none(), "taken reports are forgotten");
}
