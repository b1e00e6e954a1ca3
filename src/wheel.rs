//! `TimerWheel`: every timer of the event loop (status polls, handshake and idle timeouts,
//! keepalive pings, reconnect back-off) in one sans-IO hashed timer wheel.
//!
//! It owns the armed timers, one-shot and periodic, with their values, and decides which of them
//! are due relative to a clock that is always *passed in*. It must not read the clock
//! (`Instant::now()`), sleep, or touch sockets or mio: the loop asks `next_deadline()` for its poll
//! timeout, polls, reads the clock once and hands that `now` to `expire()`, then acts on the values
//! that came back (and may `cancel` other timers while doing so).
//!
//! Layout: time is counted in `u64` ticks from an origin. A timer sits in slot `tick & mask`
//! with its absolute tick and exact deadline stored, so a deadline several rotations away simply
//! stays in its slot while the cursor passes it. Entries live in a slab (`Vec` + free list) with a
//! generation per entry, so stale keys are harmless; each slot is an intrusive doubly-linked list
//! through the entries, so insert and cancel are O(1). An occupancy bitmap (one bit per slot)
//! lets `expire` and `next_deadline` skip empty slots a machine word at a time, so a `now` that
//! jumped millions of ticks ahead costs at most one pass over the slots, not one step per tick.
//!
//! Firing rule: a timer fires in the first `expire(now)` with `now >= deadline`, so never early;
//! `next_deadline()` reports the deadline rounded up to its tick, so a loop that sleeps until that
//! Instant fires every timer less than one tick late.

use std::cell::Cell;
use std::fmt;
use std::time::{Duration, Instant};

/// "No entry": end of a slot list or of the free list.
const NIL: u32 = u32::MAX;
const NANOS_PER_SEC: u128 = 1_000_000_000;
/// Upper bound on the number of slots (rounded up to a power of two below that).
const MAX_SLOTS: usize = 1 << 24;

/// Names one timer armed by [`TimerWheel::insert`] or [`TimerWheel::insert_periodic`].
///
/// A key is only a handle: once its timer is cancelled, or a one-shot timer has fired, the key is
/// stale and [`TimerWheel::cancel`] ignores it, even when its slab entry was reused for a new timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerKey {
    index: u32,
    generation: u32,
}

/// How a periodic timer re-arms: its period and how to copy its value into `fired`.
struct Repeat<T> {
    period_ns: i128,
    /// `T::clone`, captured by `insert_periodic` so `expire` needs no `T: Clone` bound.
    clone: fn(&T) -> T,
}

/// The payload of an occupied slab entry. Periodic timers are few, so their rule is boxed and
/// a one-shot entry stays small.
struct Armed<T> {
    value: T,
    repeat: Option<Box<Repeat<T>>>,
}

/// One slab entry: a node of a slot list while armed, a node of the free list while vacant.
///
/// Kept small (48 bytes with a 16-byte `T`): every open client connection has one. Indices
/// and generations are `u32`; a generation wraps after 2^32 reuses of one entry, and only a
/// key kept stale for that long could then name the new timer. The entry's tick is not
/// stored: it is its deadline rounded up, or the cursor if that is later (see `tick_of_entry`).
struct Entry<T> {
    /// Bumped each time the entry is freed, so keys handed out earlier go stale.
    generation: u32,
    /// The slot whose list holds the entry while armed.
    slot: u32,
    prev: u32,
    /// Next entry of the same slot while armed; next free entry while vacant.
    next: u32,
    /// Exact deadline in nanoseconds from the origin (negative: before the origin), saturated
    /// at about 292 years either way.
    deadline_ns: i64,
    armed: Option<Armed<T>>,
}

/// Head and tail of one slot's intrusive list (append at the tail keeps insertion order).
#[derive(Clone, Copy)]
struct Slot {
    head: u32,
    tail: u32,
}

/// The smallest reported tick among armed timers, cached so a quiet loop asks in O(1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MinCache {
    /// Unknown: recompute with a bitmap scan.
    Stale,
    /// No armed timer.
    Empty,
    /// Exactly this tick.
    Tick(u64),
}

/// A hashed timer wheel holding values of type `T` until their deadline passes.
///
/// Complexity (n armed timers, S slots, W = S / 64 bitmap words):
/// * `insert`, `insert_periodic`, `cancel`: O(1) (amortised for the slab's growth).
/// * `expire(now)`: O(W' + m + k log k), where W' is the bitmap words covering the ticks elapsed
///   since the previous call (at most W, however far `now` jumped), m the entries in the occupied
///   slots passed, and k the timers that fire (they are sorted into deadline order).
/// * `next_deadline`: O(1) while the cached minimum is valid. It is invalidated only when the
///   earliest timer is cancelled or something fires; the recomputation walks occupied slots from
///   the cursor and stops at the first slot holding a timer due within the current rotation, so it
///   costs O(W + entries in the slots passed): O(n) only when every timer is more than one
///   rotation away, and then the result is cached again.
pub struct TimerWheel<T> {
    origin: Instant,
    tick_ns: u128,
    /// The largest tick whose Instant is representable; ticks are clamped to it.
    max_tick: u64,
    /// Slot count minus one (the slot count is a power of two).
    mask: u64,
    /// Every tick before the cursor has fully elapsed; every armed timer has `tick >= cursor`.
    cursor: u64,
    slots: Vec<Slot>,
    /// One bit per slot: set while the slot's list is non-empty.
    occupied: Vec<u64>,
    entries: Vec<Entry<T>>,
    free_head: u32,
    len: usize,
    min_cache: Cell<MinCache>,
    /// Reused buffer of (deadline, entry) collected by `expire`.
    scratch: Vec<(i64, u32)>,
}

impl<T> fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerWheel")
            .field("origin", &self.origin)
            .field("tick_ns", &self.tick_ns)
            .field("slots", &self.slots.len())
            .field("cursor", &self.cursor)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<T> TimerWheel<T> {
    /// An empty wheel. `origin` is the Instant tick 0 stands for; `tick` is the resolution (a zero
    /// tick is taken as 1 ns); `slots` is rounded up to a power of two (at least 1, at most 2^24).
    /// Deadlines further than `tick * slots` ahead are fine: they wait in their slot for their turn.
    pub fn new(origin: Instant, tick: Duration, slots: usize) -> Self {
        let tick_ns = tick.as_nanos().max(1);
        let slot_count = slots.clamp(1, MAX_SLOTS).next_power_of_two();
        let mut wheel = TimerWheel {
            origin,
            tick_ns,
            max_tick: 0,
            mask: slot_count as u64 - 1,
            cursor: 0,
            slots: vec![Slot { head: NIL, tail: NIL }; slot_count],
            occupied: vec![0; slot_count.div_ceil(64)],
            entries: Vec::new(),
            free_head: NIL,
            len: 0,
            min_cache: Cell::new(MinCache::Empty),
            scratch: Vec::new(),
        };
        wheel.max_tick = wheel.find_max_tick();
        wheel
    }

    /// Arms a one-shot timer for `at` and returns its key. O(1).
    ///
    /// `next_deadline` reports `at` rounded up to a tick. An `at` already in the past fires at the
    /// next `expire`.
    pub fn insert(&mut self, at: Instant, value: T) -> TimerKey {
        let deadline_ns = self.offset_of(at);
        self.arm(deadline_ns, Armed { value, repeat: None })
    }

    /// Arms a periodic timer firing at `first`, `first + period`, `first + 2 * period`, ... and
    /// returns its key, which stays valid until the timer is cancelled. O(1).
    ///
    /// Each firing puts a clone of `value` into `fired`. The timer re-arms on its own grid
    /// (`deadline + period`, not `now + period`), so it never drifts; grid points that a late
    /// `expire` already left behind are skipped, so a stall yields one firing, not a burst.
    /// A zero `period` is taken as 1 ns (then it fires at most once per `expire`).
    pub fn insert_periodic(&mut self, first: Instant, period: Duration, value: T) -> TimerKey
    where
        T: Clone,
    {
        let deadline_ns = self.offset_of(first);
        let period_ns = i128::try_from(period.as_nanos()).unwrap_or(i128::MAX).max(1);
        let repeat = Repeat { period_ns, clone: <T as Clone>::clone };
        self.arm(deadline_ns, Armed { value, repeat: Some(Box::new(repeat)) })
    }

    /// Disarms the timer `key` names and returns its value. O(1).
    ///
    /// Returns `None`, and changes nothing, for a stale key: already cancelled, a one-shot timer
    /// that already fired (even in the `expire` call that just returned), or a key whose slab entry
    /// now holds another timer. Cancelling a periodic timer stops it for good.
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        let entry = self.entries.get(key.index as usize)?;
        if entry.generation != key.generation || entry.armed.is_none() {
            return None;
        }
        let reported = self.ticks_ceil(entry.deadline_ns.into());
        self.unlink(key.index);
        let armed = self.release(key.index)?;
        self.note_removed(reported);
        Some(armed.value)
    }

    /// Whether `key` still names an armed timer.
    pub fn contains(&self, key: TimerKey) -> bool {
        self.entries
            .get(key.index as usize)
            .is_some_and(|entry| entry.generation == key.generation && entry.armed.is_some())
    }

    /// When `key`'s timer fires (its deadline rounded up to its tick), or `None` when it is no
    /// longer armed.
    pub fn deadline(&self, key: TimerKey) -> Option<Instant> {
        let entry = self.entries.get(key.index as usize).filter(|e| e.generation == key.generation)?;
        entry.armed.as_ref().map(|_| self.instant_of(self.tick_of_entry(entry)))
    }

    /// The earliest pending deadline, rounded up to its tick's Instant, or `None` when no timer is
    /// armed. Meant as the poll timeout: it may lie in the past (a timer armed for a past Instant),
    /// then poll should not block. See the type's docs for its cost (O(1) when cached).
    pub fn next_deadline(&self) -> Option<Instant> {
        let tick = match self.min_cache.get() {
            MinCache::Empty => return None,
            MinCache::Tick(tick) => tick,
            MinCache::Stale => {
                let min = self.scan_min_tick();
                self.min_cache.set(min.map_or(MinCache::Empty, MinCache::Tick));
                min?
            }
        };
        Some(self.instant_of(tick))
    }

    /// Appends to `fired` the values of every timer whose deadline is at or before `now`, in
    /// deadline order (equal deadlines in insertion order). One-shot timers are gone afterwards;
    /// periodic timers put a clone in and re-arm.
    ///
    /// `now` may jump arbitrarily far ahead: the work is bounded by one pass over the slots plus
    /// the timers visited, never one step per elapsed tick. A `now` earlier than a previous one
    /// fires nothing new and does not move the wheel back.
    pub fn expire(&mut self, now: Instant, fired: &mut Vec<T>) {
        let now_ns = self.offset_of(now);
        // The tick containing `now`; it is only partly elapsed unless `now` sits on its boundary.
        let last = self.tick_of(now);
        let mut due = std::mem::take(&mut self.scratch);
        due.clear();
        if self.len > 0 && last >= self.cursor {
            let start = self.slot_of(self.cursor);
            let ticks = (last - self.cursor).saturating_add(1);
            // Past one whole rotation every slot has been covered once.
            let span = ticks.min(self.slots.len() as u64) as usize;
            let mut dist = 0;
            while let Some(d) = self.next_occupied(start, dist) {
                if d >= span {
                    break;
                }
                let mut index = self.slots[(start + d) & self.mask as usize].head;
                while index != NIL {
                    let entry = &self.entries[index as usize];
                    if i128::from(entry.deadline_ns) <= now_ns {
                        due.push((entry.deadline_ns, index));
                    }
                    index = entry.next;
                }
                dist = d + 1;
            }
        }
        if now_ns >= 0 {
            // Ticks up to floor(now) have fully elapsed; all their timers are in `due`.
            let elapsed = self.ticks_floor(now_ns).saturating_add(1).min(self.max_tick);
            self.cursor = self.cursor.max(elapsed);
        }
        if !due.is_empty() {
            // Stable: equal deadlines keep slot-list (insertion) order.
            due.sort_by_key(|&(deadline_ns, _)| deadline_ns);
            for &(_, index) in &due {
                self.fire(index, now_ns, fired);
            }
            self.min_cache.set(if self.len == 0 { MinCache::Empty } else { MinCache::Stale });
        }
        self.scratch = due;
    }

    /// Number of armed timers (a periodic timer counts once).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no timer is armed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The resolution the wheel was built with (at least 1 ns).
    pub fn tick(&self) -> Duration {
        duration_from_nanos(self.tick_ns).unwrap_or(Duration::MAX)
    }

    // ---- time conversions: the only place that does Instant maths ----

    /// `at` as signed nanoseconds from the origin (the exact deadline kept per timer).
    fn offset_of(&self, at: Instant) -> i128 {
        match at.checked_duration_since(self.origin) {
            Some(after) => i128::try_from(after.as_nanos()).unwrap_or(i128::MAX),
            None => {
                let before = self.origin.duration_since(at).as_nanos();
                i128::try_from(before).map_or(i128::MIN, |ns| -ns)
            }
        }
    }

    /// The tick of `at`, rounded up (so the tick's Instant is never before `at`).
    fn tick_of(&self, at: Instant) -> u64 {
        self.ticks_ceil(self.offset_of(at))
    }

    /// The Instant tick `tick` stands for.
    fn instant_of(&self, tick: u64) -> Instant {
        self.checked_instant_of(tick.min(self.max_tick))
            .expect("ticks are clamped to max_tick, whose Instant new() checked is representable")
    }

    fn checked_instant_of(&self, tick: u64) -> Option<Instant> {
        let nanos = u128::from(tick).checked_mul(self.tick_ns)?;
        self.origin.checked_add(duration_from_nanos(nanos)?)
    }

    /// The largest tick whose Instant exists (binary search, 64 steps, run once by `new`).
    fn find_max_tick(&self) -> u64 {
        let (mut lo, mut hi) = (0u64, u64::MAX);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.checked_instant_of(mid).is_some() {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    /// Nanoseconds from the origin rounded up to a tick, clamped to `0..=max_tick`.
    fn ticks_ceil(&self, ns: i128) -> u64 {
        match u128::try_from(ns) {
            Ok(ns) if ns > 0 => self.clamp_tick(ns.div_ceil(self.tick_ns)),
            _ => 0,
        }
    }

    /// Nanoseconds from the origin rounded down to a tick, clamped to `0..=max_tick`.
    fn ticks_floor(&self, ns: i128) -> u64 {
        u128::try_from(ns).map_or(0, |ns| self.clamp_tick(ns / self.tick_ns))
    }

    fn clamp_tick(&self, tick: u128) -> u64 {
        u64::try_from(tick).unwrap_or(u64::MAX).min(self.max_tick)
    }

    // ---- slab, slot lists and bitmap ----

    fn slot_of(&self, tick: u64) -> usize {
        // The mask is below the slot count, so the value fits a usize.
        (tick & self.mask) as usize
    }

    /// Stores a new timer and links it into its slot.
    fn arm(&mut self, deadline_ns: i128, armed: Armed<T>) -> TimerKey {
        let deadline_ns = saturate(deadline_ns);
        let reported = self.ticks_ceil(deadline_ns.into());
        // A deadline the cursor already passed goes into the cursor's slot: the next `expire`
        // looks there first and fires it, since its deadline is at or before that `now`.
        let tick = reported.max(self.cursor);
        let index = if self.free_head != NIL {
            let index = self.free_head;
            let entry = &mut self.entries[index as usize];
            self.free_head = entry.next;
            entry.deadline_ns = deadline_ns;
            entry.armed = Some(armed);
            index
        } else {
            let index = u32::try_from(self.entries.len()).ok().filter(|&i| i != NIL);
            // 2^32 - 1 armed timers would take over 190 GiB of entries first.
            let index = index.expect("fewer than 2^32 - 1 timers");
            self.entries.push(Entry {
                generation: 0,
                slot: 0,
                deadline_ns,
                prev: NIL,
                next: NIL,
                armed: Some(armed),
            });
            index
        };
        self.link(index, tick);
        self.len += 1;
        self.min_cache.set(match self.min_cache.get() {
            MinCache::Empty => MinCache::Tick(reported),
            MinCache::Tick(min) => MinCache::Tick(min.min(reported)),
            MinCache::Stale => MinCache::Stale,
        });
        TimerKey { index, generation: self.entries[index as usize].generation }
    }

    /// Frees an unlinked entry, making every key to it stale, and returns its payload.
    fn release(&mut self, index: u32) -> Option<Armed<T>> {
        let entry = &mut self.entries[index as usize];
        let armed = entry.armed.take()?;
        entry.generation = entry.generation.wrapping_add(1);
        entry.prev = NIL;
        entry.next = self.free_head;
        self.free_head = index;
        self.len -= 1;
        Some(armed)
    }

    /// Keeps the cached minimum exact after a timer reporting `tick` left the wheel.
    fn note_removed(&self, tick: u64) {
        if self.len == 0 {
            self.min_cache.set(MinCache::Empty);
        } else if self.min_cache.get() == MinCache::Tick(tick) {
            self.min_cache.set(MinCache::Stale);
        }
    }

    /// The tick whose slot holds an armed entry: its deadline rounded up, or the cursor if that
    /// is later. (Armed for a deadline the cursor had passed, it went into the cursor's slot, and
    /// the cursor has not moved since: a move would have fired it. Not for use inside `expire`
    /// once the cursor moved.)
    fn tick_of_entry(&self, entry: &Entry<T>) -> u64 {
        self.ticks_ceil(entry.deadline_ns.into()).max(self.cursor)
    }

    /// Appends an entry to the list of the slot of `tick`.
    fn link(&mut self, index: u32, tick: u64) {
        let slot = self.slot_of(tick);
        let tail = self.slots[slot].tail;
        let entry = &mut self.entries[index as usize];
        // The slot count is at most 2^24.
        entry.slot = slot as u32;
        entry.prev = tail;
        entry.next = NIL;
        if tail == NIL {
            self.slots[slot].head = index;
            self.occupied[slot / 64] |= 1 << (slot % 64);
        } else {
            self.entries[tail as usize].next = index;
        }
        self.slots[slot].tail = index;
    }

    /// Takes an entry out of its slot's list.
    fn unlink(&mut self, index: u32) {
        let Entry { slot, prev, next, .. } = self.entries[index as usize];
        let slot = slot as usize;
        if prev == NIL {
            self.slots[slot].head = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next == NIL {
            self.slots[slot].tail = prev;
        } else {
            self.entries[next as usize].prev = prev;
        }
        if self.slots[slot].head == NIL {
            self.occupied[slot / 64] &= !(1 << (slot % 64));
        }
        let entry = &mut self.entries[index as usize];
        entry.prev = NIL;
        entry.next = NIL;
    }

    /// Delivers one due timer: a one-shot timer's value moves into `fired`; a periodic timer
    /// clones its value in and re-arms on its grid after `now_ns`.
    fn fire(&mut self, index: u32, now_ns: i128, fired: &mut Vec<T>) {
        self.unlink(index);
        let entry = &self.entries[index as usize];
        let armed = entry.armed.as_ref().expect("expire collects only armed entries");
        match armed.repeat.as_ref().map(|repeat| (repeat.period_ns, repeat.clone)) {
            Some((period_ns, clone)) => {
                fired.push(clone(&armed.value));
                let deadline_ns = saturate(rearm_deadline(entry.deadline_ns.into(), period_ns, now_ns));
                let tick = self.ticks_ceil(deadline_ns.into()).max(self.cursor);
                self.entries[index as usize].deadline_ns = deadline_ns;
                self.link(index, tick);
            }
            None => {
                if let Some(armed) = self.release(index) {
                    fired.push(armed.value);
                }
            }
        }
    }

    /// The first set bit in `lo..hi` of the occupancy bitmap.
    fn first_occupied_in(&self, lo: usize, hi: usize) -> Option<usize> {
        let mut at = lo;
        while at < hi {
            let word = self.occupied[at / 64] >> (at % 64);
            if word != 0 {
                let found = at + word.trailing_zeros() as usize;
                return (found < hi).then_some(found);
            }
            at = (at / 64 + 1) * 64;
        }
        None
    }

    /// The distance `d`, with `from <= d < slots`, of the first occupied slot `(start + d) & mask`.
    fn next_occupied(&self, start: usize, from: usize) -> Option<usize> {
        let count = self.slots.len();
        if from >= count {
            return None;
        }
        let at = (start + from) & self.mask as usize;
        if at >= start {
            if let Some(slot) = self.first_occupied_in(at, count) {
                return Some(slot - start);
            }
            self.first_occupied_in(0, start).map(|slot| slot + count - start)
        } else {
            self.first_occupied_in(at, start).map(|slot| slot + count - start)
        }
    }

    /// The smallest reported tick (deadline rounded up) among armed timers.
    ///
    /// Slots are visited in cursor order. The first slot holding a timer of the current rotation
    /// (`tick == cursor + distance`) ends the walk: every timer not yet seen has a larger tick.
    /// Timers of later rotations seen on the way are kept in the minimum, which covers the case
    /// where all timers are further than one rotation away.
    fn scan_min_tick(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let start = self.slot_of(self.cursor);
        let mut best: Option<u64> = None;
        let mut dist = 0;
        while let Some(d) = self.next_occupied(start, dist) {
            let this_rotation = self.cursor.saturating_add(d as u64);
            let mut found = false;
            let mut index = self.slots[(start + d) & self.mask as usize].head;
            while index != NIL {
                let entry = &self.entries[index as usize];
                // Below the entry's tick only for a deadline armed after the cursor passed it.
                let reported = self.ticks_ceil(entry.deadline_ns.into());
                best = Some(best.map_or(reported, |b| b.min(reported)));
                found |= reported.max(self.cursor) == this_rotation;
                index = entry.next;
            }
            if found {
                break;
            }
            dist = d + 1;
        }
        best
    }
}

/// The first point of the grid `deadline + k * period` (k >= 1) strictly after `now`.
fn rearm_deadline(deadline_ns: i128, period_ns: i128, now_ns: i128) -> i128 {
    let next = deadline_ns.saturating_add(period_ns);
    if next > now_ns {
        return next;
    }
    let periods = (now_ns - deadline_ns) / period_ns + 1;
    deadline_ns.saturating_add(periods.saturating_mul(period_ns))
}

/// Nanoseconds from the origin as kept per entry: past about 292 years either way, the nearest
/// end (the wheel's ticks are clamped long before that).
fn saturate(ns: i128) -> i64 {
    i64::try_from(ns).unwrap_or(if ns < 0 { i64::MIN } else { i64::MAX })
}

fn duration_from_nanos(nanos: u128) -> Option<Duration> {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).ok()?;
    // The remainder is below one second, so it fits a u32.
    Some(Duration::new(secs, (nanos % NANOS_PER_SEC) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// A tiny deterministic generator (64-bit LCG, high bits).
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, bound: u64) -> u64 {
            self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % bound
        }
    }

    fn drain<T>(wheel: &mut TimerWheel<T>, now: Instant) -> Vec<T> {
        let mut fired = Vec::new();
        wheel.expire(now, &mut fired);
        fired
    }

    #[test]
    fn many_timers_fire_once_in_order_within_one_tick() {
        let t0 = Instant::now();
        let tick = ms(1);
        let mut wheel = TimerWheel::new(t0, tick, 512);
        let mut rng = Lcg(7);
        let n = 100_000;
        let deadlines: Vec<Instant> = (0..n).map(|_| t0 + us(rng.below(60_000_000))).collect();
        for (i, &at) in deadlines.iter().enumerate() {
            wheel.insert(at, i);
        }
        assert_eq!(wheel.len(), n);

        let mut seen = vec![false; n];
        let mut last = t0;
        let mut fired = Vec::new();
        let mut rounds = 0;
        // Drive it like the event loop: sleep until next_deadline, then expire.
        while let Some(now) = wheel.next_deadline() {
            rounds += 1;
            fired.clear();
            wheel.expire(now, &mut fired);
            assert!(!fired.is_empty(), "next_deadline must name something due");
            for &i in &fired {
                assert!(!seen[i], "timer {i} fired twice");
                seen[i] = true;
                let deadline = deadlines[i];
                assert!(deadline <= now, "timer {i} fired early");
                assert!(now - deadline < tick, "timer {i} fired more than one tick late");
                assert!(deadline >= last, "out of deadline order");
                last = deadline;
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert!(wheel.is_empty());
        assert!(rounds <= 60_001);
    }

    #[test]
    fn irregular_expire_fires_each_timer_at_the_first_now_past_its_deadline() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(t0, ms(2), 64);
        let mut rng = Lcg(99);
        let n = 20_000;
        let deadlines: Vec<Instant> = (0..n).map(|_| t0 + us(rng.below(20_000_000))).collect();
        for (i, &at) in deadlines.iter().enumerate() {
            wheel.insert(at, i);
        }
        let mut seen = vec![false; n];
        let mut prev = t0;
        let mut now = t0;
        let mut last = t0;
        while !wheel.is_empty() {
            let step = if rng.below(50) == 0 { us(rng.below(3_000_000)) } else { us(rng.below(3_000)) };
            now += step;
            for i in drain(&mut wheel, now) {
                assert!(!seen[i]);
                seen[i] = true;
                assert!(deadlines[i] <= now, "fired early");
                assert!(deadlines[i] > prev || prev == t0, "should have fired at an earlier expire");
                assert!(deadlines[i] >= last, "out of deadline order");
                last = deadlines[i];
            }
            prev = now;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn cancelled_timers_never_fire_and_stale_keys_do_nothing() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(t0, ms(1), 16);
        let keys: Vec<TimerKey> = (0..100).map(|i| wheel.insert(t0 + ms(i * 3), i)).collect();
        for (i, &key) in keys.iter().enumerate() {
            if i % 3 == 0 {
                assert_eq!(wheel.cancel(key), Some(i as u64));
                assert_eq!(wheel.cancel(key), None, "second cancel is stale");
                assert!(!wheel.contains(key));
            }
        }
        assert_eq!(wheel.len(), 66);
        let fired = drain(&mut wheel, t0 + ms(1_000));
        assert_eq!(fired, (0..100).filter(|i| i % 3 != 0).collect::<Vec<_>>());
        assert!(wheel.is_empty());
        assert_eq!(wheel.next_deadline(), None);

        // A key whose timer fired is stale.
        let fired_key = wheel.insert(t0 + ms(1_001), 500);
        assert_eq!(drain(&mut wheel, t0 + ms(1_001)), vec![500]);
        assert_eq!(wheel.cancel(fired_key), None);

        // Its entry gets reused; the old key must not touch the new timer.
        let reused = wheel.insert(t0 + ms(1_010), 600);
        assert_eq!(reused.index, fired_key.index, "test expects slab reuse");
        assert_ne!(reused, fired_key);
        assert_eq!(wheel.cancel(fired_key), None);
        assert!(wheel.contains(reused));
        assert_eq!(wheel.len(), 1);
        assert_eq!(drain(&mut wheel, t0 + ms(1_010)), vec![600]);

        // Same after a cancel freed the entry.
        let a = wheel.insert(t0 + ms(1_020), 1);
        assert_eq!(wheel.cancel(a), Some(1));
        let b = wheel.insert(t0 + ms(1_020), 2);
        assert_eq!(a.index, b.index);
        assert_eq!(wheel.cancel(a), None);
        assert_eq!(drain(&mut wheel, t0 + ms(1_020)), vec![2]);
    }

    #[test]
    fn cancel_while_processing_fired_values() {
        #[derive(Clone, Debug, PartialEq)]
        enum Ev {
            Handshake,
            Poll,
            Idle,
            Ping,
        }
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(t0, ms(1), 32);
        let handshake = wheel.insert(t0 + ms(5), Ev::Handshake);
        let poll = wheel.insert_periodic(t0 + ms(5), ms(10), Ev::Poll);
        let idle = wheel.insert(t0 + ms(50), Ev::Idle);
        let ping = wheel.insert_periodic(t0 + ms(7), ms(10), Ev::Ping);

        let mut fired = Vec::new();
        wheel.expire(t0 + ms(8), &mut fired);
        assert_eq!(fired, vec![Ev::Handshake, Ev::Poll, Ev::Ping]);
        // The loop reacts to each value and cancels other timers as a result.
        for ev in fired.drain(..) {
            match ev {
                Ev::Handshake => {
                    assert_eq!(wheel.cancel(handshake), None, "fired in this very call");
                    assert_eq!(wheel.cancel(idle), Some(Ev::Idle));
                }
                Ev::Poll => assert_eq!(wheel.cancel(ping), Some(Ev::Ping), "re-armed periodic"),
                Ev::Ping => assert_eq!(wheel.cancel(ping), None, "already cancelled"),
                Ev::Idle => unreachable!(),
            }
        }
        assert_eq!(wheel.len(), 1);
        assert_eq!(wheel.next_deadline(), Some(t0 + ms(15)));
        wheel.expire(t0 + ms(15), &mut fired);
        assert_eq!(fired, vec![Ev::Poll]);
        fired.clear();
        assert_eq!(wheel.cancel(poll), Some(Ev::Poll));
        assert_eq!(wheel.cancel(poll), None);
        wheel.expire(t0 + ms(500), &mut fired);
        assert!(fired.is_empty());
        assert!(wheel.is_empty());
        assert_eq!(wheel.next_deadline(), None);
    }

    #[test]
    fn delays_beyond_one_rotation() {
        let t0 = Instant::now();
        // 64 slots of 1 ms: one rotation is 64 ms.
        let mut wheel = TimerWheel::new(t0, ms(1), 64);
        let far = t0 + ms(10 * 64 + 5);
        wheel.insert(far, 1_000);
        assert_eq!(wheel.next_deadline(), Some(far), "only timer, ten rotations away");
        for rotation in 0..10 {
            // The cursor passes the timer's slot each rotation; it must stay.
            let now = t0 + ms(rotation * 64 + 5);
            assert!(drain(&mut wheel, now).is_empty(), "fired early at rotation {rotation}");
            assert_eq!(wheel.next_deadline(), Some(far));
        }
        assert!(drain(&mut wheel, far - us(1)).is_empty());
        assert_eq!(drain(&mut wheel, far), vec![1_000]);

        // Several timers sharing one slot, different rotations, inserted out of order.
        let base = t0 + ms(1_000);
        assert!(drain(&mut wheel, base).is_empty());
        for k in [10, 3, 7, 20] {
            wheel.insert(base + ms(5 + 64 * k), k);
        }
        assert_eq!(wheel.next_deadline(), Some(base + ms(5 + 64 * 3)));
        assert_eq!(drain(&mut wheel, base + ms(5 + 64 * 3)), vec![3]);
        assert_eq!(wheel.next_deadline(), Some(base + ms(5 + 64 * 7)));
        // One jump over several rotations fires the due ones in order, leaves the rest.
        assert_eq!(drain(&mut wheel, base + ms(5 + 64 * 15)), vec![7, 10]);
        assert_eq!(wheel.next_deadline(), Some(base + ms(5 + 64 * 20)));
        assert_eq!(wheel.len(), 1);

        // Far timers in other slots: the minimum over all of them.
        wheel.insert(base + ms(64 * 18 + 40), 18);
        wheel.insert(base + ms(64 * 30 + 1), 30);
        assert_eq!(wheel.next_deadline(), Some(base + ms(64 * 18 + 40)));
        assert_eq!(drain(&mut wheel, base + ms(64 * 40)), vec![18, 20, 30]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn periodic_timer_stays_on_its_grid() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(t0, ms(1), 512);
        let first = t0 + ms(100);
        let period = ms(100);
        let key = wheel.insert_periodic(first, period, "poll");
        let mut rng = Lcg(3);
        let mut fired = Vec::new();
        let mut k: u32 = 0; // index of the next grid point
        let mut firings = 0;
        let mut stalled = false;
        while k < 1_000 {
            let grid = first + period * k;
            assert_eq!(wheel.next_deadline(), Some(grid), "drifted at period {k}");
            if k.is_multiple_of(7) {
                wheel.expire(grid - us(1), &mut fired);
                assert!(fired.is_empty(), "fired early at period {k}");
            }
            let stall = if k == 500 { 10 } else { 0 };
            let late = us(rng.below(99_000));
            wheel.expire(grid + period * stall + late, &mut fired);
            assert_eq!(fired, vec!["poll"], "exactly one firing per expire, even after a stall");
            fired.clear();
            firings += 1;
            stalled |= stall > 0;
            k += 1 + stall;
        }
        assert!(stalled);
        assert_eq!(firings, 1_000 - 10);
        assert_eq!(wheel.next_deadline(), Some(first + period * k));
        assert!(wheel.contains(key));
        assert_eq!(wheel.len(), 1);
        assert_eq!(wheel.cancel(key), Some("poll"));
        assert!(wheel.is_empty());
    }

    #[test]
    fn periodic_period_off_the_tick_grid_does_not_drift() {
        let t0 = Instant::now();
        let tick = ms(1);
        let mut wheel = TimerWheel::new(t0, tick, 64);
        let period = Duration::from_nanos(33_333_333);
        wheel.insert_periodic(t0, period, ());
        for k in 0..3_000u32 {
            let grid = t0 + period * k;
            let next = wheel.next_deadline().expect("periodic stays armed");
            assert!(next >= grid && next - grid < tick, "period {k}: {:?} off grid", next - grid);
            assert_eq!(drain(&mut wheel, next).len(), 1);
        }
    }

    #[test]
    fn next_deadline_tracks_the_earliest() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(t0, ms(1), 128);
        assert_eq!(wheel.next_deadline(), None);
        let b = wheel.insert(t0 + ms(30), 'b');
        let a = wheel.insert(t0 + ms(20), 'a');
        let c = wheel.insert(t0 + ms(40), 'c');
        assert_eq!(wheel.next_deadline(), Some(t0 + ms(20)));
        // Rounded up to the tick.
        let d = wheel.insert(t0 + us(10_200), 'd');
        assert_eq!(wheel.next_deadline(), Some(t0 + ms(11)));
        assert_eq!(wheel.cancel(d), Some('d'));
        assert_eq!(wheel.next_deadline(), Some(t0 + ms(20)));
        assert_eq!(wheel.cancel(a), Some('a'));
        assert_eq!(wheel.next_deadline(), Some(t0 + ms(30)));
        assert_eq!(wheel.cancel(c), Some('c'));
        assert_eq!(wheel.next_deadline(), Some(t0 + ms(30)));
        assert_eq!(wheel.cancel(b), Some('b'));
        assert_eq!(wheel.next_deadline(), None);
        assert!(wheel.is_empty());
    }

    #[test]
    fn past_deadlines_fire_at_the_next_expire() {
        let t0 = Instant::now();
        // Origin after t0, so deadlines before the origin are covered too.
        let origin = t0 + ms(1_000);
        let mut wheel = TimerWheel::new(origin, ms(1), 64);
        let now = origin + us(10_500);
        assert!(drain(&mut wheel, now).is_empty());
        wheel.insert(origin + us(10_200), "same tick, already past");
        wheel.insert(origin + ms(5), "ticks ago");
        wheel.insert(t0, "before origin");
        wheel.insert(now + us(100), "future");
        assert!(wheel.next_deadline().is_some_and(|d| d <= now), "poll must not block");
        assert_eq!(drain(&mut wheel, now), vec!["before origin", "ticks ago", "same tick, already past"]);
        assert_eq!(wheel.next_deadline(), Some(origin + ms(11)));
        assert_eq!(drain(&mut wheel, now + us(100)), vec!["future"]);

        // An expire with an earlier now fires nothing new and does not move the wheel back.
        wheel.insert(origin + ms(20), "later");
        assert!(drain(&mut wheel, origin).is_empty());
        assert_eq!(drain(&mut wheel, origin + ms(20)), vec!["later"]);
    }

    #[test]
    fn huge_jump_of_now_is_not_per_tick() {
        let t0 = Instant::now();
        // 1 µs ticks: a per-tick loop over 1000 hours would be 3.6e12 steps.
        let mut wheel = TimerWheel::new(t0, us(1), 512);
        wheel.insert(t0 + Duration::from_secs(3_600), "1h");
        wheel.insert(t0 + ms(1), "1ms");
        let periodic = wheel.insert_periodic(t0 + ms(2), ms(10), "tick");
        assert_eq!(drain(&mut wheel, t0 + Duration::from_secs(3_600_000)), vec!["1ms", "tick", "1h"]);
        assert_eq!(wheel.len(), 1);
        // The periodic timer continues on its grid after the stall.
        assert_eq!(wheel.next_deadline(), Some(t0 + Duration::from_secs(3_600_000) + ms(2)));
        assert_eq!(wheel.cancel(periodic), Some("tick"));

        let mut wheel = TimerWheel::new(t0, ms(1), 512);
        wheel.insert(t0 + ms(1), 1);
        wheel.insert(t0 + Duration::from_secs(3_600), 2);
        assert_eq!(drain(&mut wheel, t0 + Duration::from_secs(7_200)), vec![1, 2]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn odd_slot_counts_and_zero_period() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(t0, Duration::ZERO, 100);
        assert_eq!(wheel.slots.len(), 128);
        assert_eq!(wheel.tick(), Duration::from_nanos(1));
        let key = wheel.insert_periodic(t0 + us(1), Duration::ZERO, 0u8);
        assert_eq!(drain(&mut wheel, t0 + ms(1)), vec![0]);
        assert_eq!(drain(&mut wheel, t0 + ms(1)), Vec::<u8>::new());
        assert_eq!(drain(&mut wheel, t0 + ms(2)), vec![0]);
        assert_eq!(wheel.cancel(key), Some(0));

        let mut wheel = TimerWheel::new(t0, ms(1), 1);
        for i in 0..10 {
            wheel.insert(t0 + ms(10 - i), i);
        }
        assert_eq!(wheel.next_deadline(), Some(t0 + ms(1)));
        assert_eq!(drain(&mut wheel, t0 + ms(5)), vec![9, 8, 7, 6, 5]);
        assert_eq!(drain(&mut wheel, t0 + ms(50)), vec![4, 3, 2, 1, 0]);
    }

    #[test]
    fn deadline_tells_when_an_armed_timer_fires() {
        let t0 = Instant::now();
        let mut wheel = TimerWheel::new(t0, Duration::from_millis(1), 64);
        let key = wheel.insert(t0 + Duration::from_micros(2500), "x");
        assert_eq!(wheel.deadline(key), Some(t0 + Duration::from_millis(3)), "rounded up to its tick");
        wheel.cancel(key);
        assert_eq!(wheel.deadline(key), None);
    }

    #[test]
    fn an_entry_stays_small() {
        // One per open client connection: keep it from growing back (issue 22).
        // A 16-byte value with room for a niche, like the server's `TimerEvent`.
        assert!(std::mem::size_of::<Entry<(u64, bool)>>() <= 48);
        assert!(std::mem::size_of::<TimerKey>() <= 8);
    }
}
