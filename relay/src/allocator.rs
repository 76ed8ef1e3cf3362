//! One malloc arena for the whole relay (glibc only).
//!
//! glibc's malloc gives each new thread an arena of its own, up to eight
//! per core, and memory freed into one arena is reused by that arena only.
//! In the relay, lapin's I/O threads allocate each delivery and the
//! runtime's thread frees it (when this was measured, a thousand sessions'
//! buffers also sat in whichever tokio worker's arena their task first ran
//! on; the relay now runs on one thread): the arenas fragment, and the
//! process holds far more than it uses. With 1,000 sender accounts and
//! 30,000 messages through them, the relay peaked at 92 MiB with the
//! default arenas and at 72 MiB with one; heaptrack put its largest heap at
//! 73 MiB (see docs/performance.md, *One malloc arena in the relay*). The
//! relay's few threads allocate little, and one arena's lock showed no cost
//! in the bench.
//!
//! An operator's own `MALLOC_ARENA_MAX` (or `GLIBC_TUNABLES`) wins.

/// Limits glibc's malloc to one arena, unless the environment already says
/// how many. Call it first thing in `main`, before any thread starts: a
/// thread that has allocated keeps the arena it got.
pub fn use_one_arena() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() || std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    limit_arenas(1);
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_arenas(arenas: libc::c_int) {
    // SAFETY: mallopt only sets a parameter of glibc's allocator, under the
    // allocator's own lock; called before any other thread runs. It returns
    // 0 only for an unknown parameter, and then the defaults stay.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
}
