//! Where a connection goes on a listener with a fallback: its first bytes decide
//! (`opening.rs`). On a plain socket they are peeked (`peek.rs`), so the chosen data plane
//! still finds every byte in the receive queue; inside TLS they are read, and written to the
//! chosen upstream before the relay starts.

use std::io;

use tokio::{
    io::{AsyncRead, AsyncReadExt},
    net::TcpStream,
    time::{Instant, timeout_at},
};

use crate::{
    opening::{Expect, MAX_OPENING, Opening, classify},
    peek::{Peeked, peek_until},
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
/// Nothing is consumed.
pub async fn peek_route(
    client: &TcpStream,
    expect: Expect,
    deadline: Instant,
) -> io::Result<Route> {
    let mut buf = vec![0u8; MAX_OPENING];
    let peeked = peek_until(client, &mut buf, |bytes, finished| {
        match classify(expect, bytes) {
            // A client that stopped short of an opening cannot be one of ours.
            Opening::NeedMore(_) if finished => Peeked::Decided(Route::Fallback),
            Opening::NeedMore(wanted) => Peeked::NeedMore(wanted),
            decided => Peeked::Decided(Route::of(decided)),
        }
    });
    match timeout_at(deadline, peeked).await {
        Ok(route) => route,
        Err(_elapsed) => Ok(Route::Fallback),
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
    use crate::sys;

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
