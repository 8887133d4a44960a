//! Discard: the device hears of blocks a transaction freed, once the frees
//! are durable, as the kernel's `discard` mount option sends freed ranges
//! down after the journal commit that freed them.
//!
//! The host hands [`super::Transactions::discard_freed`] a function; each
//! commit that succeeds calls it with the blocks its transaction freed (in
//! use at the commit before, free now), coalesced into runs, before the
//! commit returns:
//!
//! - after the point that makes the frees durable: with a journal, the
//!   commit block is flushed (a crash replays the transaction, so no
//!   pointer to a freed block comes back); without one, the writes that
//!   took the pointers away are flushed before the bitmaps free the blocks
//!   ([`super::ordered`]);
//! - while the caller still holds the filesystem (`&mut`): nothing can
//!   allocate a freed block between the commit and the discard, and a
//!   block freed and allocated again in one transaction is in use, not
//!   freed, so it is never discarded.
//!
//! A discard is advice: a device that fails it loses nothing, and the
//! function reports nothing back.  A commit that fails discards nothing;
//! its frees stay in the running transaction and the next commit that
//! succeeds discards them.

/// Called with the runs of blocks `(first, count)` a commit freed.
pub type Discard = Box<dyn FnMut(&[(u64, u64)]) + Send>;
