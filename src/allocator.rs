//! How the binaries' allocator (mimalloc) gives memory back to the system.
//!
//! Pages a query frees are decommitted (`MADV_DONTNEED`) a few
//! milliseconds after they are freed, as mimalloc does by default, so the
//! gateway's resident memory falls back once its queries are done. Reset
//! pages (`MADV_FREE`, `MIMALLOC_PURGE_DECOMMITS=0`) are reused without
//! the kernel zeroing them again, which made the 22 TPC-H queries about 7%
//! faster (side by side), but they stay resident until the system runs
//! short: after six rounds of those queries the gateway held 1 008 MiB
//! rather than 762, and a stream of `lineitem` then took it to 1 074 MiB
//! rather than leaving it at 723.
//!
//! Transparent huge pages are turned off for the process. mimalloc asks
//! for them on its large regions, and a huge page is resident whole once
//! one byte of it is touched, and stays whole when part of it is purged:
//! over the TPC-H queries the gateway's resident memory peaked 300 MiB
//! higher with them (1 087 MiB against 788), and its streams 110 MiB
//! higher, for no difference in speed (both measured side by side).
//! `MIMALLOC_ALLOW_THP=1` turns them back on.

/// `mi_option_allow_thp` in mimalloc.h's `mi_option_e` (v2); the crate
/// does not name it.
const ALLOW_THP: libmimalloc_sys::mi_option_t = 37;

/// `mi_option_purge_decommits` in mimalloc.h's `mi_option_e` (the same in
/// its v2 and v3); the crate does not name it.
const PURGE_DECOMMITS: libmimalloc_sys::mi_option_t = 5;

/// Sets how the process takes and gives back memory (see the module's
/// documentation). Call first thing in `main`, before any thread is
/// started.
pub fn configure() {
    decommit_purged_pages();
    without_huge_pages();
}

/// Sets mimalloc to decommit purged pages, unless `MIMALLOC_PURGE_DECOMMITS`
/// is set.
fn decommit_purged_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DECOMMITS").is_some() {
        return;
    }
    // SAFETY: `mi_option_set` only stores the value; it is not thread-safe,
    // and this runs before the process starts a second thread.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DECOMMITS, 1) }
}

/// Turns transparent huge pages off for the process (its mappings to come,
/// mimalloc's and others), unless `MIMALLOC_ALLOW_THP` is set.
fn without_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // SAFETY: as in `reset_purged_pages`.
    unsafe { libmimalloc_sys::mi_option_set(ALLOW_THP, 0) }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `PR_SET_THP_DISABLE` takes plain integers and only sets a
        // flag of the process; a failure (an old kernel) leaves it unset.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident memory of this process, in bytes.
    fn resident() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
        let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    /// Allocates and touches `size` bytes with mimalloc, frees them and
    /// purges at once; returns how much of them is still resident.
    fn resident_after_purge(size: usize) -> usize {
        let before = resident();
        // SAFETY: the block is `size` bytes long, written only inside its
        // bounds, and freed once.
        unsafe {
            let block = libmimalloc_sys::mi_malloc(size).cast::<u8>();
            assert!(!block.is_null());
            for offset in (0..size).step_by(4096) {
                block.add(offset).write(1);
            }
            assert!(
                resident().saturating_sub(before) >= size / 10 * 9,
                "the block was not touched"
            );
            libmimalloc_sys::mi_free(block.cast());
            libmimalloc_sys::mi_collect(true);
        }
        resident().saturating_sub(before)
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn purged_pages_leave_the_resident_set() {
        let size = 256 << 20;
        // SAFETY: the test runs alone in its process (nextest), so no other
        // thread reads the option.
        let decommit = |on: bool| unsafe {
            libmimalloc_sys::mi_option_set(PURGE_DECOMMITS, on.into());
        };
        if std::env::var_os("MIMALLOC_PURGE_DECOMMITS").is_none() {
            // From the opposite setting, so that only the call sets it.
            decommit(false);
            decommit_purged_pages();
            assert!(
                resident_after_purge(size) < size / 10,
                "decommitted pages should leave the resident set"
            );
        }
        decommit(false);
        assert!(
            resident_after_purge(size) >= size / 10 * 9,
            "reset pages should stay resident until the system needs them"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn transparent_huge_pages_are_off() {
        // SAFETY: `PR_GET_THP_DISABLE` takes plain integers and reads a flag.
        let disabled = || unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
            without_huge_pages();
            assert_eq!(disabled(), 1, "huge pages should be off for the process");
            assert!(
                // SAFETY: reads an option.
                unsafe { libmimalloc_sys::mi_option_get(ALLOW_THP) } == 0,
                "mimalloc should not ask for huge pages"
            );
        }
    }
}
