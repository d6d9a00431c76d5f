//! Every call into libc, and so every `unsafe` block of the daemon, in one place. The crate
//! root denies `unsafe_code`; this module alone may use it, each block with its SAFETY note, and
//! offers safe functions with owned results.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use std::path::Path;

/// The kernel's clock-discipline state, read with `adjtimex` (modes = 0: nothing is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockReading {
    /// Not `STA_UNSYNC`, and the clock state is not `TIME_ERROR`.
    pub synchronized: bool,
    /// Maximum error (µs).
    pub max_error_us: i64,
    /// Estimated error (µs).
    pub est_error_us: i64,
    /// Offset (µs; converted from ns when the kernel reports `STA_NANO`).
    pub offset_us: i64,
}

/// Read the clock state; `None` when the kernel refuses (e.g. a seccomp filter without it).
pub fn clock_reading() -> Option<ClockReading> {
    // SAFETY: `timex` is plain data, valid when zeroed; adjtimex with modes = 0 only writes the
    // kernel's state into the struct we own and pass by exclusive reference.
    let (state, tx) = unsafe {
        let mut tx: libc::timex = std::mem::zeroed();
        (libc::adjtimex(&mut tx), tx)
    };
    if state < 0 {
        return None;
    }
    let offset = if tx.status & libc::STA_NANO != 0 {
        tx.offset / 1000
    } else {
        tx.offset
    };
    Some(ClockReading {
        synchronized: tx.status & libc::STA_UNSYNC == 0 && state != libc::TIME_ERROR,
        max_error_us: tx.maxerror as i64,
        est_error_us: tx.esterror as i64,
        offset_us: offset as i64,
    })
}

/// Free bytes on the file system holding `path`, as an unprivileged process may use them.
pub fn fs_free(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `statvfs` is plain data, valid when zeroed; the call writes into the struct we
    // own; the path is NUL-terminated and outlives the call.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return None;
        }
        Some(s.f_bavail as u64 * s.f_frsize as u64)
    }
}

/// Whether this process may create entries in the directory `dir` (`access(W_OK | X_OK)`).
pub fn may_write_in(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access() only reads the NUL-terminated path `c` keeps alive for the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// The size of a memory page.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions and reads no memory of ours.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    page.max(1) as u64
}

/// Take an exclusive `flock` on `file` without waiting: `Ok(false)` when another process holds
/// it. Released when the file is closed.
pub fn try_lock_exclusive(file: &std::fs::File) -> std::io::Result<bool> {
    // SAFETY: flock on a file descriptor `file` keeps open for the call; it reads no memory.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// What [`allocate`] did.
#[derive(Debug)]
pub enum Allocated {
    /// The blocks are allocated.
    Yes,
    /// This file system cannot preallocate (write zeros instead).
    Unsupported,
    /// Another error (no space, most often).
    Failed(std::io::Error),
}

/// `posix_fallocate(file, 0, len)`: really allocate the first `len` bytes of `file`.
pub fn allocate(file: &std::fs::File, len: u64) -> Allocated {
    // SAFETY: a plain syscall on a file descriptor `file` keeps open for the call.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    match rc {
        0 => Allocated::Yes,
        libc::EOPNOTSUPP | libc::EINVAL => Allocated::Unsupported,
        e => Allocated::Failed(std::io::Error::from_raw_os_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_exclusive_lock_on_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let a = std::fs::File::create(&p).unwrap();
        let b = std::fs::File::open(&p).unwrap();
        assert!(try_lock_exclusive(&a).unwrap());
        assert!(!try_lock_exclusive(&b).unwrap());
        drop(a);
        assert!(try_lock_exclusive(&b).unwrap());
    }

    #[test]
    fn readings_are_plausible() {
        assert!(fs_free(Path::new("/")).is_some());
        assert!(fs_free(Path::new("/no/such/dir")).is_none());
        assert!(page_size() >= 4096);
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("r")).unwrap();
        if matches!(allocate(&f, 1 << 20), Allocated::Yes) {
            assert_eq!(f.metadata().unwrap().len(), 1 << 20);
        }
    }
}
