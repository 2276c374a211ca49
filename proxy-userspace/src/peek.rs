//! Waiting for a client's first bytes without consuming them: the PROXY header and the
//! opening a fallback listener routes by are read this way, so that a kernel-mode relay
//! still finds every byte after them in the receive queue.

use std::io;

use tokio::{io::Interest, net::TcpStream};

use crate::sys;

/// What a look at the bytes so far decided.
pub enum Peeked<T> {
    Decided(T),
    /// Not yet: wake up again once this many bytes are in.
    NeedMore(usize),
}

/// Peeks at `stream`'s receive queue into `buf` until `decide` says what its bytes are.
/// `decide` is given the bytes so far and whether the peer has finished sending (nothing
/// more will come), and must decide then, and when `buf` is full. While more bytes are needed, SO_RCVLOWAT asks the
/// kernel to wake this only once they are in; it is back at 1 when this returns or is
/// dropped, since it also gates the wakeup the verdict program runs from.
pub async fn peek_until<T>(
    stream: &TcpStream,
    buf: &mut [u8],
    mut decide: impl FnMut(&[u8], bool) -> Peeked<T>,
) -> io::Result<T> {
    let _low_water = LowWater(stream);
    loop {
        let ready = stream.ready(Interest::READABLE).await?;
        // WouldBlock clears the readiness seen, so the next wait lasts until more bytes or
        // the FIN come. tokio never clears a FIN: `ready` shows it once it came, and a
        // decision is due then (without it, the wait returned at once, for good).
        let peeked = stream.try_io(Interest::READABLE, || {
            let n = sys::peek_nonblocking(stream, buf)?;
            match decide(&buf[..n], n == 0 || ready.is_read_closed()) {
                Peeked::Decided(decided) => Ok(decided),
                Peeked::NeedMore(wanted) => {
                    let wanted = wanted.max(n + 1).min(buf.len());
                    sys::set_receive_low_water(stream, wanted as libc::c_int)?;
                    Err(io::ErrorKind::WouldBlock.into())
                }
            }
        });
        match peeked {
            Ok(decided) => return Ok(decided),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Puts SO_RCVLOWAT back at 1 when dropped.
struct LowWater<'a>(&'a TcpStream);

impl Drop for LowWater<'_> {
    fn drop(&mut self) {
        // A socket that refuses it is failing; its relay reports the error.
        let _ = sys::set_receive_low_water(self.0, 1);
    }
}
