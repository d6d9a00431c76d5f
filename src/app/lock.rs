//! One daemon per data directory: an exclusive `flock` on `<data_dir>/siterelay.lock`, held for
//! the life of the [`crate::app::Daemon`]. A second daemon on the same directory would share the
//! outbox's writer role and the MQTT client id with the first (they knock each other off the
//! broker) and, on exit, remove the first's status socket; it is refused at start with the
//! holder's pid instead. The kernel drops the lock when the process dies, however it dies, so a
//! SIGKILL never leaves a stale lock behind.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use anyhow::bail;

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Take the lock on `data_dir` (created, mode 0700, if missing), or explain who holds it.
    pub fn acquire(data_dir: &Path) -> anyhow::Result<DataDirLock> {
        if !data_dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(data_dir)?;
        }
        let path = data_dir.join("siterelay.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("cannot open the lock file {}: {e}", path.display()))?;
        match crate::sys::try_lock_exclusive(&file) {
            Ok(true) => {}
            Ok(false) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another siterelay".to_owned()
                } else {
                    format!("another siterelay (pid {holder})")
                };
                bail!(
                    "{who} is already running on the data directory {}: only one daemon may use \
                     an outbox (stop the other one, or give this one its own data_dir)",
                    data_dir.display()
                );
            }
            Err(err) => bail!("cannot lock {}: {err}", path.display()),
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        file.flush()?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_naming_the_holder_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let e = DataDirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(&format!("pid {}", std::process::id())),
            "names the holder: {e}"
        );
        assert!(e.contains("already running"), "{e}");
        drop(first);
        DataDirLock::acquire(dir.path()).expect("free again once the holder is gone");
    }
}
