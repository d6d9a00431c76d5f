//! Real pseudo-terminals for serial-port tests: the daemon opens the slave side by path (through
//! a symlink, as a udev `/dev/serial/by-id/...` name would be), the test plays the device on the
//! master side. Closing the master makes the slave read EIO: a USB adapter unplugged.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// The master side of a pseudo-terminal.
pub struct Pty {
    master: File,
    /// `/dev/pts/N`.
    pub slave_path: PathBuf,
}

impl Pty {
    /// Open a new pty pair; the slave is closed again here (the daemon opens it by path).
    pub fn open() -> Result<Pty> {
        let (master, slave) = match crate::sys::openpty_raw() {
            Ok(pair) => pair,
            Err(e) => bail!("openpty failed: {e}"),
        };
        let slave_path = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd()))?;
        drop(slave);
        Ok(Pty {
            master: File::from(master),
            slave_path,
        })
    }

    /// Point `link` at this pty's slave (replacing what it pointed at).
    pub fn link_at(&self, link: &Path) -> Result<()> {
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(&self.slave_path, link)?;
        Ok(())
    }

    /// Write bytes as the device.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.master.write_all(bytes)?;
        self.master.flush()?;
        Ok(())
    }

    /// Read what the daemon wrote, waiting up to `timeout` for at least one byte.
    pub fn read_timeout(&mut self, timeout: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            if crate::sys::poll_readable(&self.master, ms) {
                let mut buf = [0u8; 4096];
                match self.master.read(&mut buf) {
                    Ok(n) => return Ok(buf[..n].to_vec()),
                    // EIO: nobody has the slave open (yet).
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
