//! Large byte buffers that the kernel may back with huge pages.
//!
//! A buffer of tens of MiB that daffi fills (a large frame read off a socket) is often
//! fresh memory, which the kernel maps and zeroes on first touch one 4 KiB page at a
//! time: 16,384 page faults for 64 MiB. Where transparent huge pages are enabled for
//! memory that asks for them (`madvise`, the usual default), a buffer advised before its
//! first write is faulted in 2 MiB at a time instead (32 faults). Whether that is
//! cheaper depends on where the memory comes from: the reader decides
//! (`FrameReader::large_buffer`), and daffi's pool of copies the same way. Elsewhere
//! than Linux the buffer is an ordinary one.

use std::mem::MaybeUninit;

/// The huge page size that buffers are advised in (x86-64's, and arm64's with 4 KiB
/// pages); buffers smaller than one are never advised.
const HUGE_PAGE: usize = 2 * 1024 * 1024;

/// An empty buffer with room for `capacity` bytes, which the kernel may back with huge
/// pages where it holds whole aligned 2 MiB blocks: only those are advised, so the
/// advice never covers memory outside the buffer.
pub fn huge_page_buffer(capacity: usize) -> Vec<u8> {
    let mut buffer = Vec::with_capacity(capacity);
    if capacity >= HUGE_PAGE {
        advise_huge_pages(buffer.spare_capacity_mut());
    }
    buffer
}

/// Whether a kept buffer of `capacity` bytes may take `len` bytes: room enough, and at
/// most twice that, so that a small string never holds a huge buffer. One rule for
/// every buffer handed on (a reader's idle one, a pooled one).
pub fn room_suits(capacity: usize, len: usize) -> bool {
    (len..=len.saturating_mul(2)).contains(&capacity)
}

/// Gives an empty buffer with room for so many bytes, if it has one.
type Lender = fn(usize) -> Option<Vec<u8>>;

/// Where readers look for a new large frame's buffer before they allocate one (see
/// [`lend_large_buffers`]).
static LENDER: std::sync::OnceLock<Lender> = std::sync::OnceLock::new();

/// Lets readers take a new large frame's buffer (1 MiB or more) from `lender`, which
/// returns an empty buffer with room for that many bytes if it has one: memory the
/// process has finished with and keeps for a moment, already mapped. For a process
/// whose large frames' buffers are taken over (a byte-string argument decoded into a
/// `Vec<u8>` and sent back as the result, say): the reader then cannot reuse its own,
/// and the one that comes back from the result is there instead. The first lender set
/// stays.
pub fn lend_large_buffers(lender: Lender) {
    let _ = LENDER.set(lender);
}

/// An empty buffer with room for `capacity` bytes from the lender, if one is set and has
/// one.
pub(crate) fn lent_buffer(capacity: usize) -> Option<Vec<u8>> {
    let buffer = LENDER.get()?(capacity)?;
    (buffer.capacity() >= capacity && buffer.is_empty()).then_some(buffer)
}

/// Asks the kernel to back the aligned 2 MiB blocks of `memory` with huge pages. Advice
/// only: if the kernel refuses it, the memory gets ordinary pages.
#[cfg(target_os = "linux")]
fn advise_huge_pages(memory: &mut [MaybeUninit<u8>]) {
    let Some(blocks) = huge_page_blocks(memory.as_mut_ptr() as usize, memory.len()) else {
        return;
    };
    // SAFETY: `blocks` lies inside `memory`, which the caller holds mutably, and is
    // page-aligned. MADV_HUGEPAGE changes only how the kernel backs those pages, never
    // what they hold, and touches no memory outside the range.
    let advised = unsafe {
        libc::madvise(
            blocks.start as *mut libc::c_void,
            blocks.len(),
            libc::MADV_HUGEPAGE,
        )
    };
    if advised != 0 {
        tracing::trace!(
            error = %std::io::Error::last_os_error(),
            bytes = blocks.len(),
            "huge pages not available for a large buffer; it gets ordinary pages"
        );
    }
}

/// The addresses of the whole aligned 2 MiB blocks in `len` bytes from `start`, if any.
#[cfg(any(target_os = "linux", test))]
fn huge_page_blocks(start: usize, len: usize) -> Option<std::ops::Range<usize>> {
    let first = start.checked_next_multiple_of(HUGE_PAGE)?;
    let end = start.checked_add(len)? / HUGE_PAGE * HUGE_PAGE;
    (first < end).then_some(first..end)
}

/// Huge pages are advised on Linux only.
#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_memory: &mut [MaybeUninit<u8>]) {}

/// Whether this kernel has transparent huge pages (for tests: without them, nothing is
/// advised).
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn kernel_has_huge_pages() -> bool {
    std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists()
}

/// The `VmFlags` of the mapping `at` lies in, from `/proc/self/smaps`.
#[cfg(all(test, target_os = "linux"))]
fn vm_flags(at: usize) -> Option<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        let range = line
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'));
        if let Some((Ok(start), Ok(end))) =
            range.map(|(s, e)| (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)))
        {
            inside = (start..end).contains(&at);
            continue;
        }
        if let Some(flags) = line.strip_prefix("VmFlags:").filter(|_| inside) {
            return Some(flags.to_string());
        }
    }
    None
}

/// Whether the mapping `at` lies in is advised for huge pages (for tests).
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn advised(at: usize) -> bool {
    let flags = vm_flags(at).expect("a mapping in /proc/self/smaps");
    flags.split_whitespace().any(|flag| flag == "hg")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills `buffer` up to its capacity and checks every byte reads back.
    fn fill_and_check(buffer: &mut Vec<u8>) {
        let capacity = buffer.capacity();
        buffer.extend((0..capacity).map(|i| (i % 251) as u8));
        assert_eq!(buffer.len(), capacity);
        assert!(buffer
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i % 251) as u8));
    }

    #[test]
    fn a_large_buffer_holds_what_is_written_at_every_size() {
        for capacity in [
            0,
            10,
            HUGE_PAGE - 1,
            HUGE_PAGE,
            HUGE_PAGE + 4097,
            64 * 1024 * 1024,
        ] {
            let mut buffer = huge_page_buffer(capacity);
            assert!(buffer.is_empty());
            assert_eq!(buffer.capacity(), capacity);
            fill_and_check(&mut buffer);
        }
    }

    #[test]
    fn only_whole_aligned_blocks_are_advised() {
        const MIB: usize = 1024 * 1024;
        let at = 0x7f00_0000_0010;
        assert_eq!(
            huge_page_blocks(at, 64 * MIB),
            Some(0x7f00_0020_0000..0x7f00_0400_0000),
            "64 MiB from 16 bytes past a boundary: 31 blocks, the edges left out"
        );
        let aligned = 0x7f00_0000_0000;
        assert_eq!(
            huge_page_blocks(aligned, 2 * MIB),
            Some(aligned..aligned + 2 * MIB)
        );
        assert_eq!(huge_page_blocks(aligned, 2 * MIB - 1), None);
        assert_eq!(huge_page_blocks(at, 3 * MIB), None, "no whole block inside");
        assert_eq!(huge_page_blocks(at, 0), None);
        assert_eq!(huge_page_blocks(usize::MAX - MIB, MIB), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_kernel_is_asked_for_huge_pages_inside_a_large_buffer_only() {
        if !kernel_has_huge_pages() {
            eprintln!("no transparent huge pages in this kernel: nothing to check");
            return;
        }
        let mut large = huge_page_buffer(16 * HUGE_PAGE);
        let start = large.as_ptr() as usize;
        let blocks = huge_page_blocks(start, large.capacity()).expect("32 MiB holds blocks");
        assert!(advised(blocks.start) && advised(blocks.end - 1));
        if blocks.start != start {
            assert!(!advised(start), "the advice reaches before the first block");
        }
        fill_and_check(&mut large);
    }
}
