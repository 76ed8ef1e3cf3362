//! The relay's allocator: mimalloc, without transparent huge pages.
//!
//! A job's memory is allocated on one thread and freed on another: lapin's
//! I/O thread allocates each delivery, the runtime's thread frees it.
//! glibc's malloc serves such frees through its arena's lock and bins
//! (`malloc_consolidate`, `unlink_chunk`); in a profile of the relay
//! draining a backlog, malloc and free were 30 % of its samples. mimalloc
//! hands a block freed by another thread back to its page without a lock:
//! the relay drained at 23–26 µs of CPU a job with it, against 32–33 µs
//! (docs/performance.md, *mimalloc in the relay*). The ingress keeps glibc:
//! there it saved no CPU that the runs could tell from noise, and its peak
//! RSS rose by 2 MiB.
//!
//! mimalloc reserves its memory in large aligned regions. Where the kernel
//! backs those with 2 MiB transparent huge pages, a first touch takes a
//! whole huge page: the relay's peak RSS was 58–65 MiB with them and 33–36
//! MiB without. So mimalloc is built not to ask for them (its `no_thp`
//! feature), and [`no_huge_pages`] opts the process out where the system
//! hands them out unasked (`transparent_hugepage=always`).

/// The global allocator, declared in `main.rs`.
pub type Allocator = mimalloc::MiMalloc;

/// Keeps the kernel from backing this process's memory with transparent
/// huge pages, whatever the system's setting. Call it first thing in `main`;
/// it also applies to memory already mapped. Does nothing off Linux.
pub fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    disable_thp();
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn disable_thp() {
    // SAFETY: PR_SET_THP_DISABLE only sets a flag on this process's memory
    // map; it takes no pointers. It fails only on kernels older than 3.15,
    // and then the system's setting stays, which costs memory, not safety.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}
