//! A session on a worker: commands with their input and capped output, long-lived
//! followers, streams read or written piece by piece, keepalives. Each step is bounded by
//! a timeout; secrets go on stdin, never on a command line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::client::{self, Handle};
use russh::keys::PublicKey;
use russh::{ChannelMsg, Disconnect};
use tokio::sync::OwnedSemaphorePermit;

use super::connect::Verifier;
use super::pool::Spares;
use super::{Output, SshError};

/// Most output kept from one command: enough for an error message, bounded in memory.
const MAX_CAPTURE: usize = 64 * 1024;

/// An authenticated SSH connection to one worker. Closing it (or dropping it) frees its
/// slot in the client's session bound.
pub struct Session {
    pub(super) handle: Arc<Handle<Verifier>>,
    pub(super) addr: String,
    /// The host key the server presented (already checked against the expected one).
    pub host_key: PublicKey,
    /// When its connection logged in.
    pub(super) logged_in: tokio::time::Instant,
    pub(super) command_timeout: Duration,
    /// Bound on opening a channel: a live server answers at once.
    pub(super) open_timeout: Duration,
    /// A channel on a connection the client keeps (a watch's, or a spare one): closing
    /// the session must not close it.
    pub(super) shared: bool,
    /// The spare map the connection is kept in, and under which worker: a connection on
    /// which no channel opens is let go from it, whoever was using it.
    pub(super) spare: Option<(Spares, String)>,
    pub(super) _permit: Option<OwnedSemaphorePermit>,
}

impl Session {
    /// Runs `command`, feeding it `stdin` then end-of-file, and collects its output.
    /// Secrets travel in `stdin`, never in `command`, which other users can see in `ps`.
    pub async fn exec(&self, command: &str, stdin: Option<&[u8]>) -> Result<Output, SshError> {
        let protocol = |cause| SshError::Protocol {
            addr: self.addr.clone(),
            cause,
        };
        let mut channel = self.open_channel().await?;
        let work = async {
            channel.exec(true, command).await.map_err(protocol)?;
            if let Some(input) = stdin {
                channel.data(input).await.map_err(protocol)?;
            }
            channel.eof().await.map_err(protocol)?;
            let mut collected = Collected::default();
            while let Some(msg) = channel.wait().await {
                collected.take(msg);
            }
            Ok(collected.output())
        };
        tokio::time::timeout(self.command_timeout, work)
            .await
            .map_err(|_| SshError::Timeout {
                addr: self.addr.clone(),
                stage: "command",
                after: self.command_timeout,
            })?
    }

    /// Runs a long-lived `command` (a stream of events) and calls `each` with every line
    /// of its stdout as it arrives, until the command ends or the connection drops. No
    /// command timeout: the caller bounds it (by dropping the future).
    pub async fn follow(&self, command: &str, mut each: impl FnMut(&str)) -> Result<(), SshError> {
        let protocol = |cause| SshError::Protocol {
            addr: self.addr.clone(),
            cause,
        };
        let mut channel = self.open_channel().await?;
        channel.exec(true, command).await.map_err(protocol)?;
        channel.eof().await.map_err(protocol)?;
        let mut pending: Vec<u8> = Vec::new();
        while let Some(msg) = channel.wait().await {
            if let ChannelMsg::Data { data } = msg {
                pending.extend_from_slice(&data);
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    each(String::from_utf8_lossy(&line).trim_end());
                }
                if pending.len() > MAX_CAPTURE {
                    pending.clear();
                }
            }
        }
        Ok(())
    }

    /// Opens a session channel, bounded by the open timeout: a live server answers at
    /// once, and a connection that died unnoticed fails here, before anything ran.
    async fn open_channel(&self) -> Result<russh::Channel<client::Msg>, SshError> {
        let not_opened = |cause: String| SshError::ChannelOpen {
            addr: self.addr.clone(),
            cause,
        };
        let failed =
            match tokio::time::timeout(self.open_timeout, self.handle.channel_open_session()).await
            {
                Ok(Ok(channel)) => return Ok(channel),
                Ok(Err(e)) => not_opened(e.to_string()),
                Err(_) => not_opened(format!("no answer within {:?}", self.open_timeout)),
            };
        if let Some((spare, name)) = &self.spare {
            let mut spare = spare.lock().expect("spare connections poisoned");
            if spare
                .get(name)
                .is_some_and(|s| Arc::ptr_eq(&s.handle, &self.handle))
            {
                spare.remove(name);
            }
        }
        Err(failed)
    }

    /// Starts `command` and returns its stdout as it comes, piece by piece
    /// ([`Reading::next`]): a stream too big to hold (a home's archive). The channel is
    /// not read while the caller works on a piece, so a slow reader slows the sender
    /// rather than filling memory.
    pub async fn exec_reading(&self, command: &str) -> Result<Reading, SshError> {
        let channel = self.open_channel().await?;
        let protocol = |cause| SshError::Protocol {
            addr: self.addr.clone(),
            cause,
        };
        channel.exec(true, command).await.map_err(protocol)?;
        channel.eof().await.map_err(protocol)?;
        let (read, write) = channel.split();
        Ok(Reading {
            read,
            write,
            collected: Collected::default(),
            addr: self.addr.clone(),
            idle: self.command_timeout,
        })
    }

    /// Runs `command` with the pieces of `source` as its stdin, then end-of-file, and
    /// collects its (capped) output. Output is read while stdin is written, so a
    /// command that talks back cannot stall the stream. Fails if the command ends
    /// before it took everything, or if nothing moves for the command timeout.
    pub async fn exec_writing(
        &self,
        command: &str,
        source: impl futures::Stream<Item = anyhow::Result<Vec<u8>>>,
    ) -> anyhow::Result<Output> {
        use futures::StreamExt;
        let channel = self.open_channel().await?;
        let protocol = |cause| SshError::Protocol {
            addr: self.addr.clone(),
            cause,
        };
        channel.exec(true, command).await.map_err(protocol)?;
        let (mut read, write) = channel.split();
        let idle = self.command_timeout;
        // When the stream last moved: the command may stay silent while it takes input.
        let base = Instant::now();
        let moved_ms = std::sync::atomic::AtomicU64::new(0);
        let since_moved = || {
            let at = Duration::from_millis(moved_ms.load(std::sync::atomic::Ordering::Relaxed));
            base.elapsed().saturating_sub(at)
        };
        let send = async {
            let sent = async {
                futures::pin_mut!(source);
                while let Some(piece) = source.next().await {
                    let piece = piece?;
                    tokio::time::timeout(idle, write.data(&piece[..]))
                        .await
                        .map_err(|_| {
                            anyhow::anyhow!("{}: the command took no input for {idle:?}", self.addr)
                        })?
                        .map_err(protocol)?;
                    moved_ms.store(
                        base.elapsed().as_millis() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
                write.eof().await.map_err(protocol)?;
                anyhow::Ok(())
            }
            .await;
            if sent.is_err() {
                // The command must not wait for the rest: closing ends it.
                let _ = write.close().await;
            }
            sent
        };
        let receive = async {
            let mut collected = Collected::default();
            loop {
                match tokio::time::timeout(idle, read.wait()).await {
                    Ok(Some(msg)) => collected.take(msg),
                    Ok(None) => break,
                    Err(_) if since_moved() < idle => continue,
                    Err(_) => break,
                };
            }
            collected.output()
        };
        let (sent, out) = tokio::join!(send, receive);
        if let Err(e) = sent
            && out.exit_status.is_none()
        {
            return Err(e);
        }
        Ok(out)
    }

    /// A keepalive request that the server must answer. OpenSSH answers it with a
    /// failure, as for any request it does not know: the answer is what counts.
    pub async fn keepalive(&self) -> Result<(), SshError> {
        match self
            .handle
            .send_global_request("keepalive@openssh.com", &[], true)
            .await
        {
            Ok(_) | Err(russh::Error::RequestDenied) => Ok(()),
            Err(cause) => Err(SshError::Protocol {
                addr: self.addr.clone(),
                cause,
            }),
        }
    }

    /// When this session's connection completed its handshake and login: what it proves
    /// of the worker is that recent (a kept connection may be older than the session).
    pub fn logged_in(&self) -> tokio::time::Instant {
        self.logged_in
    }

    /// Whether this session is a channel on a worker's watch connection (rather than a
    /// connection of its own).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Says goodbye politely; errors are irrelevant at this point.
    pub async fn close(&self) {
        if self.shared {
            return;
        }
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// A command's stdout, read as it comes ([`Session::exec_reading`]).
pub struct Reading {
    read: russh::ChannelReadHalf,
    /// Kept so the channel stays open until the command ends, and to close it early.
    write: russh::ChannelWriteHalf<client::Msg>,
    /// The exit status and stderr as they arrive (stdout goes to the caller).
    collected: Collected,
    addr: String,
    /// The command fails if nothing arrives for this long.
    idle: Duration,
}

impl Reading {
    /// The next piece of stdout; `None` once the command has ended (then [`Reading::finish`]
    /// tells how).
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, SshError> {
        loop {
            let msg = tokio::time::timeout(self.idle, self.read.wait())
                .await
                .map_err(|_| SshError::Timeout {
                    addr: self.addr.clone(),
                    stage: "stream",
                    after: self.idle,
                })?;
            match msg {
                None => return Ok(None),
                Some(ChannelMsg::Data { data }) => return Ok(Some(data.to_vec())),
                Some(other) => self.collected.take(other),
            }
        }
    }

    /// Stops reading early: the channel is closed, so the command ends rather than
    /// sending the rest for nothing.
    pub async fn close(&self) {
        let _ = self.write.close().await;
    }

    /// What the command wrote on stderr so far (capped).
    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&self.collected.stderr).into_owned()
    }

    /// The command's exit status and (capped) stderr, once [`Reading::next`] said `None`.
    pub fn finish(self) -> Output {
        self.collected.output()
    }
}

/// A command's output as it arrives: stdout and stderr capped, the exit status.
#[derive(Default)]
struct Collected {
    exit_status: Option<u32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Collected {
    fn take(&mut self, msg: ChannelMsg) {
        match msg {
            ChannelMsg::Data { data } => append_capped(&mut self.stdout, &data),
            ChannelMsg::ExtendedData { data, .. } => append_capped(&mut self.stderr, &data),
            ChannelMsg::ExitStatus { exit_status } => self.exit_status = Some(exit_status),
            _ => {}
        }
    }

    fn output(self) -> Output {
        Output {
            exit_status: self.exit_status,
            stdout: String::from_utf8_lossy(&self.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&self.stderr).into_owned(),
        }
    }
}

fn append_capped(buf: &mut Vec<u8>, data: &[u8]) {
    let room = MAX_CAPTURE.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
}
