//! Large buffers on 2 MiB pages where the kernel allows it.
//!
//! A decode step streams ~1.4 GB of weights (DeepSeek-V2-Lite Q4_0); on 4 KiB
//! pages that is ~340 000 TLB misses and page walks per token, and 2.2 million page
//! faults while the weights are repacked at load. Linux hands out transparent huge
//! pages only to regions marked `MADV_HUGEPAGE` where its setting is `madvise` (the
//! common default; `always` needs no mark, `never` ignores it), so large buffers are
//! marked before they are first written.

/// Bytes of a huge page on x86-64 Linux.
pub const HUGE_PAGE: usize = 2 << 20;

/// `len` zeroed values (`T::default()`: zero for the number types) whose whole 2 MiB
/// pages are marked for transparent huge pages (Linux; elsewhere, or below one huge
/// page, a plain vector).
pub fn zeroed<T: Clone + Default>(len: usize) -> Vec<T> {
    let mut v = vec![T::default(); len];
    advise_huge(&mut v);
    v
}

/// Marks the whole 2 MiB pages inside `buf` `MADV_HUGEPAGE` (best effort: an error,
/// such as a kernel without THP, leaves the memory as it was). Returns the bytes
/// marked. Large allocations come from `mmap` still untouched, so their first
/// writes fault in huge pages.
pub fn advise_huge<T>(buf: &mut [T]) -> usize {
    #[cfg(target_os = "linux")]
    {
        let start = buf.as_mut_ptr() as usize;
        let first = start.next_multiple_of(HUGE_PAGE);
        let end = (start + std::mem::size_of_val(buf)) & !(HUGE_PAGE - 1);
        if end > first {
            // SAFETY: `first..end` lies inside `buf`, which this call borrows
            // mutably; MADV_HUGEPAGE only changes how later faults in the range are
            // served (page size), never the bytes it holds, and the allocator still
            // owns and later frees the mapping as before.
            let r = unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE)
            };
            if r == 0 {
                return end - first;
            }
        }
        0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = buf;
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marked_buffers_are_zeroed_writable_and_marked_in_whole_huge_pages() {
        let mut v: Vec<u8> = zeroed(5 * HUGE_PAGE + 123);
        assert!(v.iter().all(|&b| b == 0));
        for (i, b) in v.iter_mut().enumerate().step_by(4096) {
            *b = i as u8;
        }
        assert_eq!(v[4096], (4096usize) as u8);
        let marked = advise_huge(&mut v);
        #[cfg(target_os = "linux")]
        {
            // At least four whole huge pages lie inside 5 MiB + change, and the
            // mark covers only whole pages inside the buffer (0 where the kernel
            // has no THP).
            assert!(marked == 0 || (marked >= 4 * HUGE_PAGE && marked <= v.len()));
            assert_eq!(marked % HUGE_PAGE, 0);
        }
        let _ = marked;
        // Too small for one huge page: nothing marked, still a zeroed buffer.
        let mut small: Vec<u8> = zeroed(1000);
        assert_eq!(advise_huge(&mut small), 0);
        // Counted in bytes whatever the element type: 1 MiB of f32 values is 4 MiB.
        let mut f: Vec<f32> = zeroed(HUGE_PAGE / 2);
        assert!(f.iter().all(|&x| x == 0.0));
        #[cfg(target_os = "linux")]
        {
            let marked = advise_huge(&mut f);
            assert!(marked == 0 || marked >= HUGE_PAGE);
        }
    }
}
