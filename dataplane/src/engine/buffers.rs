//! The buffers a connection moves bytes through, as the connection core sees them: by
//! id, with their contents reachable only while the kernel is not using them. The ring
//! implements this over its own memory; the core's tests implement it over `Vec`s.

/// A buffer held by the ring (or a test's stand-in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BufId(pub(super) u32);

/// A buffer holds a window of pending bytes: a receive appends to it, a send or
/// `consume` takes from its front.
pub trait Buffers {
    /// A new empty buffer of `len` bytes.
    fn alloc(&mut self, len: usize) -> BufId;
    /// Give a buffer back; if an operation still uses it, after that operation.
    fn release(&mut self, id: BufId);
    /// The pending bytes, or nothing while an operation uses the buffer.
    fn data(&self, id: BufId) -> &[u8];
    /// No bytes pending, whether or not an operation uses the buffer.
    fn is_empty(&self, id: BufId) -> bool;
    /// Mark `n` pending bytes as used.
    fn consume(&mut self, id: BufId, n: usize);
    /// Let `fill` write into the free tail of an idle buffer; it returns how many bytes
    /// it wrote (0, and `fill` is not called, while an operation uses the buffer).
    fn fill<E>(
        &mut self,
        id: BufId,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<usize, E>;

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
