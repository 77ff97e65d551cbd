//! Loading thousands of VM directories at once (a cold start, a full rescan): the work
//! is a few system calls and a JSON parse per directory, so it spreads over the cores.

/// Below this many items the work stays on the calling thread: starting threads costs
/// more than it saves.
const PARALLEL_MIN: usize = 256;
/// More threads than this only contend for the directory's locks.
const MAX_THREADS: usize = 8;

fn threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_THREADS)
}

/// `f` applied to consecutive slices of `items` that cover it in order: one slice per
/// core when there are many items, the whole of it otherwise. For work that costs less
/// done a slice at a time (one supervisor query for many VMs). A panic in `f` is
/// re-raised on the caller's thread.
pub fn map_slices<T, R, F>(items: &[T], f: F) -> Vec<R>
where
    T: Sync,
    R: Send,
    F: Fn(&[T]) -> R + Sync,
{
    let threads = threads();
    if threads < 2 || items.len() < PARALLEL_MIN {
        return vec![f(items)];
    }
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(items.len().div_ceil(threads))
            .map(|c| scope.spawn(move || f(c)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// `f` applied to every item, in order, on up to one scoped thread per core. A panic in
/// `f` is re-raised on the caller's thread.
pub fn map_parallel<T, R, F>(items: Vec<T>, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(T) -> R + Sync,
{
    let threads = threads();
    if threads < 2 || items.len() < PARALLEL_MIN {
        return items.into_iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let mut items = items.into_iter();
    let chunks: Vec<Vec<T>> = (0..threads)
        .map(|_| items.by_ref().take(chunk).collect())
        .collect();
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|c| scope.spawn(move || c.into_iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_order_small_and_large() {
        for n in [0, 1, 10, PARALLEL_MIN, 10_007] {
            let items: Vec<usize> = (0..n).collect();
            let out = map_parallel(items, |i| i * 2);
            assert_eq!(out, (0..n).map(|i| i * 2).collect::<Vec<_>>());
            let slices = map_slices(&(0..n).collect::<Vec<usize>>(), |s| s.to_vec());
            assert!(slices.len() <= MAX_THREADS, "{}", slices.len());
            assert_eq!(slices.concat(), (0..n).collect::<Vec<_>>());
        }
    }
}
