//! Where a connection goes on a listener with a fallback: its first bytes decide
//! (`opening.rs`). On a plain socket they are peeked, so the chosen data plane still finds
//! every byte in the receive queue; inside TLS they are read, and written to the chosen
//! upstream before the relay starts.

use std::io;

use tokio::{
    io::{AsyncRead, AsyncReadExt},
    net::TcpStream,
    time::{Instant, timeout_at},
};

use crate::{
    opening::{Expect, MAX_OPENING, Opening, classify},
    sys,
};

/// Where a connection goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The listener's pool: the client opened as the listener expects.
    Pool,
    /// The fallback: anything else, including silence until `deadline` and a client that
    /// closed before its opening was complete.
    Fallback,
}

impl Route {
    fn of(opening: Opening) -> Self {
        match opening {
            Opening::Expected => Self::Pool,
            Opening::Other | Opening::NeedMore(_) => Self::Fallback,
        }
    }
}

/// Peeks at `client`'s receive queue until its first bytes decide, or `deadline` passes.
/// Nothing is consumed. While more bytes are needed, SO_RCVLOWAT asks the kernel to wake
/// this only once they are in; it is back at 1 on return, since it also gates the wakeup
/// the verdict program runs from.
pub async fn peek_route(
    client: &TcpStream,
    expect: Expect,
    deadline: Instant,
) -> io::Result<Route> {
    let mut buf = vec![0u8; MAX_OPENING];
    let opening = timeout_at(deadline, peek_opening(client, expect, &mut buf)).await;
    sys::set_receive_low_water(client, 1)?;
    match opening {
        Ok(opening) => opening.map(Route::of),
        Err(_elapsed) => Ok(Route::Fallback),
    }
}

async fn peek_opening(client: &TcpStream, expect: Expect, buf: &mut [u8]) -> io::Result<Opening> {
    loop {
        let ready = client.ready(tokio::io::Interest::READABLE).await?;
        // WouldBlock clears the readiness seen, so the next wait lasts until more bytes (or
        // the FIN) come. tokio never clears a FIN: `ready` shows it once it came.
        let peeked = client.try_io(tokio::io::Interest::READABLE, || {
            let n = sys::peek_nonblocking(client, buf)?;
            match classify(expect, &buf[..n]) {
                Opening::NeedMore(_) if n == 0 || ready.is_read_closed() => Ok(Opening::Other),
                Opening::NeedMore(wanted) => {
                    sys::set_receive_low_water(client, wanted as libc::c_int)?;
                    Err(io::ErrorKind::WouldBlock.into())
                }
                decided => Ok(decided),
            }
        });
        match peeked {
            Ok(opening) => return Ok(opening),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads `client` (TLS, already decrypted) until its first bytes decide, or `deadline`
/// passes. Returns the route and the bytes read, which the chosen upstream must get first.
pub async fn read_route<S: AsyncRead + Unpin>(
    client: &mut S,
    expect: Expect,
    deadline: Instant,
) -> io::Result<(Route, Vec<u8>)> {
    let mut opening = Vec::with_capacity(MAX_OPENING);
    let read = timeout_at(deadline, async {
        loop {
            match classify(expect, &opening) {
                Opening::NeedMore(wanted) => {
                    let want = wanted - opening.len();
                    let n = (&mut *client)
                        .take(want as u64)
                        .read_buf(&mut opening)
                        .await?;
                    if n == 0 {
                        return Ok(Opening::Other);
                    }
                }
                decided => return Ok(decided),
            }
        }
    })
    .await;
    match read {
        Ok(Ok(decided)) => Ok((Route::of(decided), opening)),
        Ok(Err(e)) => Err(e),
        Err(_elapsed) => Ok((Route::Fallback, opening)),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{io::AsyncWriteExt, net::TcpListener};

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (client, accepted)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[tokio::test]
    async fn a_prologue_in_pieces_is_routed_to_the_pool_and_left_unread() {
        let (mut client, accepted) = pair().await;
        let peeking = tokio::spawn(async move {
            let route = peek_route(&accepted, Expect::Whatsapp, soon())
                .await
                .unwrap();
            (route, sys::unread(&accepted).unwrap())
        });
        for piece in [&b"W"[..], b"A\x06", b"\x05hello"] {
            client.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        assert_eq!(peeking.await.unwrap(), (Route::Pool, 9));
    }

    #[tokio::test]
    async fn a_probe_a_silent_client_and_a_short_close_go_to_the_fallback() {
        let (mut client, accepted) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(
            peek_route(&accepted, Expect::Whatsapp, soon())
                .await
                .unwrap(),
            Route::Fallback
        );
        let (_silent, accepted) = pair().await;
        let shortly = Instant::now() + Duration::from_millis(50);
        assert_eq!(
            peek_route(&accepted, Expect::Whatsapp, shortly)
                .await
                .unwrap(),
            Route::Fallback
        );
        let (mut client, accepted) = pair().await;
        client.write_all(b"WA").await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(
            peek_route(&accepted, Expect::Whatsapp, soon())
                .await
                .unwrap(),
            Route::Fallback
        );
    }

    #[tokio::test]
    async fn read_route_returns_exactly_the_bytes_it_read() {
        let (mut client, mut accepted) = pair().await;
        client.write_all(b"WA\x06\x05").await.unwrap();
        let (route, read) = read_route(&mut accepted, Expect::Whatsapp, soon())
            .await
            .unwrap();
        assert_eq!((route, read.as_slice()), (Route::Pool, &b"WA\x06\x05"[..]));
        client.write_all(b"POST /").await.unwrap();
        let (route, read) = read_route(&mut accepted, Expect::Whatsapp, soon())
            .await
            .unwrap();
        assert_eq!(route, Route::Fallback);
        assert!(b"POST /".starts_with(&read) && !read.is_empty());
    }
}
