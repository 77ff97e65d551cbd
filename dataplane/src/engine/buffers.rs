//! The buffers a connection moves bytes through, as the connection core sees them: by
//! id, with their contents reachable only while the kernel is not using them. The ring
//! implements this over its own memory; the core's tests implement it over `Vec`s.

use std::ops::Range;

/// Where the pending bytes of a fixed-size buffer are: `start..end` of `0..len`.
/// Receives and fills append at `end`; sends and consumers take from `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    len: usize,
    start: usize,
    end: usize,
}

impl Window {
    /// A buffer of `len` bytes whose first `filled` are pending.
    pub fn new(len: usize, filled: usize) -> Window {
        Window {
            len,
            start: 0,
            end: filled.min(len),
        }
    }

    pub fn pending(&self) -> Range<usize> {
        self.start..self.end
    }

    /// Where more bytes may go.
    pub fn free(&self) -> Range<usize> {
        self.end..self.len
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The buffer's size.
    pub fn capacity(&self) -> usize {
        self.len
    }

    /// `n` more bytes are pending (at most up to the end).
    pub fn extend(&mut self, n: usize) {
        self.end = (self.end + n).min(self.len);
    }

    /// `n` pending bytes are used; an emptied window starts over at the front.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
}

/// A buffer held by the ring (or a test's stand-in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BufId(pub(super) u32);

/// A buffer holds a window of pending bytes: a receive appends to it, a send or
/// `consume` takes from its front. Implementors say how to reach a buffer; what is
/// done with it is the same everywhere, below.
pub trait Buffers {
    /// A new empty buffer of `len` bytes.
    fn alloc(&mut self, len: usize) -> BufId;
    /// Give a buffer back; if an operation still uses it, after that operation.
    fn release(&mut self, id: BufId);
    /// The bytes of a buffer no operation uses, and their window; `None` otherwise.
    fn idle(&self, id: BufId) -> Option<(&[u8], &Window)>;
    fn idle_mut(&mut self, id: BufId) -> Option<(&mut [u8], &mut Window)>;
    /// No bytes pending, whether or not an operation uses the buffer.
    fn is_empty(&self, id: BufId) -> bool;
    /// The buffer's size, whether or not an operation uses it.
    fn capacity(&self, id: BufId) -> usize;

    /// The pending bytes, or nothing while an operation uses the buffer.
    fn data(&self, id: BufId) -> &[u8] {
        self.idle(id).map_or(&[], |(mem, w)| &mem[w.pending()])
    }

    /// Mark `n` pending bytes as used.
    fn consume(&mut self, id: BufId, n: usize) {
        if let Some((_, w)) = self.idle_mut(id) {
            w.consume(n);
        }
    }

    /// Let `fill` write into the free tail of an idle buffer; it returns how many bytes
    /// it wrote (0, and `fill` is not called, while an operation uses the buffer).
    fn fill<E>(
        &mut self,
        id: BufId,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        let Some((mem, w)) = self.idle_mut(id) else {
            return Ok(0);
        };
        let n = fill(&mut mem[w.free()])?;
        w.extend(n);
        Ok(n)
    }

    /// Let `drain` read the pending bytes; it returns how many it used.
    fn drain<E>(
        &mut self,
        id: BufId,
        drain: impl FnOnce(&[u8]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        let n = drain(self.data(id))?;
        self.consume(id, n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_fills_drains_and_starts_over() {
        let mut w = Window::new(8, 0);
        assert!(w.is_empty() && w.free() == (0..8));
        w.extend(5);
        assert_eq!(w.pending(), 0..5);
        w.consume(2);
        assert_eq!((w.pending(), w.free()), (2..5, 5..8));
        w.extend(10);
        assert_eq!(w.pending(), 2..8);
        w.consume(100);
        assert!(w.is_empty());
        assert_eq!(w.free(), 0..8, "emptied: the whole buffer is free again");
        assert_eq!(Window::new(4, 9).pending(), 0..4);
    }
}
