//! A small, really full-able file system for disk-full tests: a `tmpfs` of a given size mounted
//! on a new temporary directory, unmounted when dropped.
//!
//! Mounting needs root (CAP_SYS_ADMIN), as CI has. Without it [`Tmpfs::mount`] panics, so a
//! missing fault test is never mistaken for a passing one, unless `SITERELAY_SKIP_ROOT_TESTS=1`
//! says to skip: then it prints a line saying so and returns `None` (the caller returns early).

use std::path::Path;

/// Set to `1` to skip (not fail) tests that need root to mount a tmpfs.
pub const SKIP_ROOT_ENV: &str = "SITERELAY_SKIP_ROOT_TESTS";

/// A mounted tmpfs; unmounted (lazily) on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mount a tmpfs of `bytes` (rounded up to pages by the kernel) on a new temporary
    /// directory. See the module note for what happens without root.
    pub fn mount(bytes: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let err = match crate::sys::mount_tmpfs(dir.path(), &format!("size={bytes},mode=0700")) {
            Ok(()) => return Some(Tmpfs { dir }),
            Err(e) => e,
        };
        if std::env::var(SKIP_ROOT_ENV).as_deref() == Ok("1") {
            eprintln!(
                "cannot mount a tmpfs ({err}; needs root): skipping because {SKIP_ROOT_ENV}=1"
            );
            return None;
        }
        panic!(
            "this test mounts a small tmpfs to fill a disk and needs root (CAP_SYS_ADMIN): {err}. \
             Run it as root (CI does), or set {SKIP_ROOT_ENV}=1 to skip it"
        );
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Free bytes on it now.
    pub fn free(&self) -> u64 {
        crate::sys::fs_free(self.path()).expect("statvfs on the tmpfs")
    }

    /// Fill it with a file of zeros until it is full, leaving `leave` bytes free (or less); the
    /// file is returned so the test can delete it.
    pub fn fill(&self, name: &str, leave: u64) -> std::path::PathBuf {
        use std::io::Write;
        let p = self.path().join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![0u8; 4096];
        while self.free() > leave {
            if f.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = f.flush();
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        crate::sys::unmount_lazy(self.path());
    }
}
