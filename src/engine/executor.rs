//! The engine's GPU half: what the scheduler decided, carried out. Inputs
//! and descriptors written, the op lists of `plans.rs` submitted (one
//! submission per step or chain), the sampled tokens read back, timing and
//! profiles recorded; a sequence's cache given back at admission (prefill,
//! swap-in, replay) and copied out at a swap; the compression passes.

use std::time::Instant;

use crate::engine::sequence::{Event, Outcome, Parked, Sequence, Swapped, TokenLogprobs};
use crate::engine::serve::Engine;
use crate::error::Result;
use crate::kv::compression::CompressConfig;
use crate::kv::{Exhausted, SeqTables};
use crate::model::llama::{final_norm, push_lm_head};
use crate::ops::sample::{NO_TOKEN, mark_seen, seen_words};

/// How an admitted sequence started.
pub(crate) enum Started {
    /// A fresh prompt's prefill sampled its first token.
    Token(u32),
    /// A preempted sequence has its cache back; its pending token is next.
    Resumed,
    /// A replay ran out of pages; it waits again.
    OutOfPages,
}

/// The events one sampled token's logits give: the logits themselves when
/// captured, the request's logprobs when it asked.
fn report_logits(
    s: &Sequence,
    token: u32,
    logits: Vec<f32>,
    capture: bool,
    events: &mut Vec<Event>,
) {
    if let Some(k) = s.req.logprobs {
        events.push(Event::Logprobs {
            id: s.id,
            logprobs: TokenLogprobs::from_logits(&logits, token, k),
        });
    }
    if capture {
        events.push(Event::Logits { id: s.id, logits });
    }
}

impl Engine<'_> {
    /// Gives an admitted sequence (lane set) its cache: a fresh prompt's
    /// prefill and first token, a swapped-out cache restored, or a replay.
    pub(super) fn start(&mut self, s: &mut Sequence, events: &mut Vec<Event>) -> Result<Started> {
        if let Some(c) = &self.compressor {
            c.reset_lane(self.ctx, s.lane)?;
        }
        // The lane's repetition-penalty mask starts from the sequence's tokens.
        let words = seen_words(self.cfg.vocab_size);
        let mut mask = vec![0u32; words];
        mark_seen(&mut mask, &s.tokens);
        self.seen.write(self.ctx, s.lane * words, &mask)?;
        match std::mem::replace(&mut s.parked, Parked::Fresh) {
            Parked::Fresh => {
                self.grow_tables(s, s.tokens.len())?;
                let token = self.prefill(s)?;
                if self.capture_logits || s.req.logprobs.is_some() {
                    let logits = self
                        .acts
                        .logits
                        .read_range(self.ctx, 0, self.cfg.vocab_size)?;
                    report_logits(s, token, logits, self.capture_logits, events);
                }
                Ok(Started::Token(token))
            }
            Parked::Swapped(sw) => {
                let new = s
                    .tables
                    .grow_to(&sw.kv.lens, &mut self.kv.alloc)
                    .map_err(|_| self.sched.exhausted_error(s, &self.kv.alloc))?;
                self.kv.write_pages(self.ctx, s.lane, &new)?;
                self.kv.write_sequence(self.ctx, &s.tables, &sw.kv)?;
                if let (Some(c), Some(state)) = (&self.compressor, &sw.lane) {
                    c.restore_lane(self.ctx, s.lane, state)?;
                }
                log::debug!(
                    "request {} swapped in: {} pages, lane {}",
                    s.id,
                    new.len(),
                    s.lane
                );
                Ok(Started::Resumed)
            }
            Parked::Replay { held } => {
                let t = Instant::now();
                if self.replay(s)? {
                    log::debug!(
                        "request {} replayed: {} tokens in {:.1} ms",
                        s.id,
                        s.tokens.len() - 1,
                        t.elapsed().as_secs_f64() * 1e3
                    );
                    Ok(Started::Resumed)
                } else {
                    s.parked = Parked::Replay { held };
                    Ok(Started::OutOfPages)
                }
            }
        }
    }

    /// `n` more slots for every head of `s` (a new chunk), or an error if
    /// the pool cannot hold them.
    fn grow_tables(&mut self, s: &mut Sequence, n: usize) -> Result<()> {
        let new = s
            .tables
            .append(n, &mut self.kv.alloc)
            .map_err(|_| self.sched.exhausted_error(s, &self.kv.alloc))?;
        self.kv.write_pages(self.ctx, s.lane, &new)
    }

    /// Copies a preempted sequence's pages (`tables`, as they were in
    /// `lane`) and its compressor state to the host.
    pub(super) fn swap_out(&self, tables: &SeqTables, lane: usize) -> Result<Swapped> {
        Ok(Swapped {
            kv: self.kv.read_sequence(self.ctx, tables)?,
            lane: match &self.compressor {
                Some(c) => Some(c.save_lane(self.ctx, lane)?),
                None => None,
            },
        })
    }

    /// Runs a sequence's prefill (all its tokens, in chunks; its tables
    /// hold them) and samples the next token.
    fn prefill(&mut self, s: &mut Sequence) -> Result<u32> {
        let total = s.tokens.len();
        self.prefill_chunks(s, total, true)
            .map(|t| t.unwrap_or(NO_TOKEN))
    }

    /// Prefills `s.tokens[..upto]` in chunks (the tables hold them), samples
    /// the next token if `sample`, and compresses after it as the method's
    /// prefill schedule says.
    fn prefill_chunks(
        &mut self,
        s: &mut Sequence,
        upto: usize,
        sample: bool,
    ) -> Result<Option<u32>> {
        let profiled = std::mem::take(&mut self.profile_prefill);
        let mut profile = vec![];
        let chunk = self.config.prefill_chunk;
        let mut token = None;
        for start in (0..upto).step_by(chunk) {
            let n = chunk.min(upto - start);
            let last = start + n == upto;
            for (i, p) in self.pos_host[..n].iter_mut().enumerate() {
                *p = (start + i) as u32;
            }
            self.acts
                .write_inputs(self.ctx, &s.tokens[start..start + n], &self.pos_host[..n])?;
            self.kv.set_row(0, s.lane, &s.tables, Some(start + n));
            self.kv.upload_rows(self.ctx)?;
            if let Some(c) = &self.compressor {
                c.set_lanes(self.ctx, &[s.lane as u32])?;
            }
            let body = self.prefill_ops(n, 0, start + n)?;
            let mut head = vec![];
            if last && sample {
                head.push(final_norm(self.ctx, &self.weights, &self.acts, n - 1, 1)?);
                push_lm_head(&mut head, self.ctx, &self.weights, &self.acts, n - 1, 1)?;
                head.push(
                    self.sampler
                        .dispatch(self.ctx, 1, &self.acts.logits, &self.seen, &self.tokens_out)?
                        .into(),
                );
                head.push(self.token_slot.copy_from(self.tokens_out.raw(), 0, 4)?);
                let u = s.rng.uniform();
                self.sampler
                    .set_rows(self.ctx, [(s.req.sampling, s.lane, u)])?;
            }
            if profiled {
                profile.extend(
                    self.ctx
                        .profile_ops("kvsift.engine.prefill", &[&body, &head])?,
                );
            } else {
                self.ctx.run_ops("kvsift.engine.prefill", &[&body, &head])?;
            }
            if last && sample {
                token = Some(self.token_slot.read::<u32>(self.ctx, 1)?[0]);
            }
        }
        if profiled {
            self.last_profile = Some(profile);
        }
        if self.compressor.is_some() && s.compression.compresses_after_prefill(upto) {
            self.compress_sequence(s)?;
        }
        Ok(token)
    }

    /// Rebuilds a preempted sequence's cache exactly as it was: the prompt's
    /// prefill (same chunks, same compression), then one decode step per
    /// generated token but the pending one, compressing where the decode
    /// schedule did. False if the pool ran out on the way.
    fn replay(&mut self, s: &mut Sequence) -> Result<bool> {
        // It redoes passes the sequence already had: its report counts them once.
        let counted = (s.passes, s.slots_dropped);
        let replayed = self.replay_steps(s);
        (s.passes, s.slots_dropped) = counted;
        replayed
    }

    fn replay_steps(&mut self, s: &mut Sequence) -> Result<bool> {
        let prompt = s.req.prompt.len();
        self.grow_tables(s, prompt)?;
        self.prefill_chunks(s, prompt, false)?;
        if self.replay_body.is_none() {
            self.replay_body = Some(self.decode_body(1)?);
        }
        for pos in prompt..s.pending_pos() {
            match s.tables.append(1, &mut self.kv.alloc) {
                Ok(new) => self.kv.write_pages(self.ctx, s.lane, &new)?,
                Err(Exhausted { .. }) => return Ok(false),
            }
            self.acts
                .write_inputs(self.ctx, &[s.tokens[pos]], &[pos as u32])?;
            self.kv.set_row(0, s.lane, &s.tables, None);
            self.kv.upload_rows(self.ctx)?;
            if let Some(c) = &self.compressor {
                c.set_lanes(self.ctx, &[s.lane as u32])?;
            }
            let body = self.replay_body.as_deref().unwrap_or_default();
            self.ctx.run_ops("kvsift.engine.replay", &[body])?;
            self.compress_after_decode(s, pos)?;
        }
        Ok(true)
    }

    /// Runs the compression pass over the tables in `lane`, as `cfg` says;
    /// the slots it dropped.
    pub(super) fn compress(
        &mut self,
        lane: usize,
        tables: &mut SeqTables,
        cfg: &CompressConfig,
    ) -> Result<u64> {
        match self.compressor.as_mut() {
            Some(c) => c.compress(self.ctx, &mut self.kv, lane, tables, cfg),
            None => Ok(0),
        }
    }

    /// A compression pass over a running sequence, counted in its report.
    fn compress_sequence(&mut self, s: &mut Sequence) -> Result<()> {
        s.note_peak();
        s.slots_dropped += self.compress(s.lane, &mut s.tables, &s.compression)?;
        s.passes += 1;
        Ok(())
    }

    /// The decode schedule's compression after the step that fed position `pos`.
    fn compress_after_decode(&mut self, s: &mut Sequence, pos: usize) -> Result<()> {
        if self.compressor.is_some() && s.compression.compresses_after_decode(pos) {
            self.compress_sequence(s)?;
        }
        Ok(())
    }

    /// Tells the compressor which lane each row of the next step belongs to.
    fn set_compressor_lanes(&mut self) -> Result<()> {
        if let Some(c) = &self.compressor {
            for (row, s) in self.sched.running.iter().enumerate() {
                self.lanes_host[row] = s.lane as u32;
            }
            c.set_lanes(self.ctx, &self.lanes_host[..self.sched.running.len()])?;
        }
        Ok(())
    }

    /// The GPU half of a decode step for the running sequences: inputs,
    /// one submission, the sampled tokens back (and their logits, when
    /// captured).
    fn decode_tokens(&mut self, events: &mut Vec<Event>) -> Result<Vec<u32>> {
        let start = Instant::now();
        let b = self.sched.running.len();
        for (row, s) in self.sched.running.iter().enumerate() {
            self.ids_host[row] = s.tokens.last().copied().unwrap_or(0);
            self.pos_host[row] = s.pending_pos() as u32;
            self.kv.set_row(row, s.lane, &s.tables, None);
        }
        self.kv.upload_rows(self.ctx)?;
        self.set_compressor_lanes()?;
        self.acts
            .write_inputs(self.ctx, &self.ids_host[..b], &self.pos_host[..b])?;
        self.sampler.set_rows(
            self.ctx,
            self.sched
                .running
                .iter_mut()
                .map(|s| (s.req.sampling, s.lane, s.rng.uniform())),
        )?;
        self.ensure_decode_plan(b)?;
        let profiled = std::mem::take(&mut self.profile_next);
        let readback = [self
            .token_slot
            .copy_from(self.tokens_out.raw(), 0, (b * 4) as u64)?];
        let step = &self.decode_plans[&b];
        if profiled {
            self.last_profile = Some(
                self.ctx
                    .profile_ops("kvsift.engine.decode", &[step, &readback])?,
            );
        } else {
            self.ctx
                .run_ops("kvsift.engine.decode", &[step, &readback])?;
        }
        let submitted = Instant::now();
        let tokens = self.token_slot.read::<u32>(self.ctx, b)?;
        if !profiled {
            self.decode_timing.record(1, start, submitted);
        }
        // Logits come back only for the rows that asked (the first to the last).
        let wants = |s: &Sequence| self.capture_logits || s.req.logprobs.is_some();
        let running = &self.sched.running;
        if let (Some(first), Some(last)) = (
            running.iter().position(wants),
            running.iter().rposition(wants),
        ) {
            let v = self.cfg.vocab_size;
            let rows = self
                .acts
                .logits
                .read_range(self.ctx, first * v, (last + 1 - first) * v)?;
            for (row, logits) in rows.chunks_exact(v).enumerate() {
                let r = first + row;
                if wants(&running[r]) {
                    report_logits(
                        &running[r],
                        tokens[r],
                        logits.to_vec(),
                        self.capture_logits,
                        events,
                    );
                }
            }
        }
        Ok(tokens)
    }

    /// One decode step of every running sequence, its tokens recorded.
    pub(super) fn decode(&mut self, events: &mut Vec<Event>) {
        let tokens = match self.decode_tokens(events) {
            Ok(tokens) => tokens,
            Err(e) => {
                return self.sched.fail_running(&e, &mut self.kv.alloc, events);
            }
        };
        let running = std::mem::take(&mut self.sched.running);
        for (mut s, token) in running.into_iter().zip(tokens) {
            let pos = s.pending_pos();
            if let Err(e) = self.compress_after_decode(&mut s, pos) {
                self.sched.fail(s, &e, &mut self.kv.alloc, events);
                continue;
            }
            self.sched.accept(s, token, &mut self.kv.alloc, events);
        }
    }

    /// The GPU half of `k` chained decode steps: staged inputs, one
    /// submission, every step's tokens back (`[step][row]`).
    fn chain_tokens(&mut self, k: usize) -> Result<Vec<u32>> {
        let start = Instant::now();
        let b = self.sched.running.len();
        for (row, s) in self.sched.running.iter().enumerate() {
            self.ids_host[row] = s.tokens.last().copied().unwrap_or(0);
        }
        self.acts.write_ids(self.ctx, &self.ids_host[..b])?;
        for j in 0..k {
            for (row, s) in self.sched.running.iter().enumerate() {
                self.pos_host[row] = (s.pending_pos() + j) as u32;
                self.kv.set_row_before(row, s.lane, &s.tables, k - 1 - j);
            }
            self.kv.stage_rows(self.ctx, j)?;
            self.acts
                .stage_positions(self.ctx, j, &self.pos_host[..b])?;
            self.sampler.stage_rows(
                self.ctx,
                j,
                self.sched
                    .running
                    .iter_mut()
                    .map(|s| (s.req.sampling, s.lane, s.rng.uniform())),
            )?;
        }
        self.set_compressor_lanes()?;
        self.ensure_chain_plan(b, k)?;
        self.ctx
            .run_ops("kvsift.engine.decode_chain", &[&self.chain_plans[&(b, k)]])?;
        let submitted = Instant::now();
        let tokens = self.token_slot.read::<u32>(self.ctx, k * b)?;
        self.decode_timing.record(k as u64, start, submitted);
        Ok(tokens)
    }

    /// `k` decode steps of every running sequence in one submission (slots
    /// already appended by the scheduler's chain growth): the same tokens
    /// as `k` single steps, read back once.
    pub(super) fn decode_chain(&mut self, k: usize, events: &mut Vec<Event>) {
        let tokens = match self.chain_tokens(k) {
            Ok(tokens) => tokens,
            Err(e) => {
                return self.sched.fail_running(&e, &mut self.kv.alloc, events);
            }
        };
        let b = self.sched.running.len();
        let mut running = std::mem::take(&mut self.sched.running);
        let mut outcome: Vec<Outcome> = (0..b).map(|_| Outcome::Running).collect();
        for j in 0..k {
            for (row, s) in running.iter_mut().enumerate() {
                if matches!(outcome[row], Outcome::Running) {
                    outcome[row] = self.sched.record(s, tokens[j * b + row], k - 1 - j, events);
                }
            }
        }
        for (mut s, outcome) in running.into_iter().zip(outcome) {
            if matches!(outcome, Outcome::Running) {
                // The chain's last step fed the token before the newest: a
                // compression trigger can only fall there.
                let pos = s.tokens.len() - 2;
                if let Err(e) = self.compress_after_decode(&mut s, pos) {
                    self.sched.fail(s, &e, &mut self.kv.alloc, events);
                    continue;
                }
            }
            self.sched.settle(s, outcome, &mut self.kv.alloc, events);
        }
    }
}
