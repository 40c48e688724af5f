//! A test "pod": answers `[NAME @ ENV] <-RECEIVED` and, with `--next`, first
//! calls the next service through its own sidecar and puts that answer in
//! front (innermost call first), like the apps of alibaba/virtual-environment.
//!
//! Serves HTTP/1.1 and h2c (prior knowledge) on one port. The outbound call
//! copies the propagation headers (`--propagate`) as a traced app would;
//! `--no-propagate` copies none (an app that forwards nothing).
//!
//! `--source-ip` binds the outbound connection to that local address: with
//! one shared gateway instead of sidecars, each "pod" gets its own loopback
//! IP (127.0.0.x) and the gateway tells pods apart by the TCP peer address.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

#[derive(Debug, Clone)]
struct Args {
    name: String,
    env: String,
    listen: SocketAddr,
    /// Sidecar address for the outbound call.
    next: Option<SocketAddr>,
    /// `:authority` of the outbound call, e.g. `go:8080`.
    next_host: String,
    /// Speak h2c on the outbound call.
    h2: bool,
    /// Header whose value is shown after `<-` (`empty` when absent).
    show: String,
    propagate: Vec<String>,
    /// Local address of the outbound connection (port chosen by the OS).
    source_ip: Option<IpAddr>,
}

fn usage() -> String {
    "usage: envlane-testapp --name N --env E --listen ADDR [--next ADDR --next-host HOST[:PORT]] \
     [--h2] [--show HEADER] [--propagate H1,H2 | --no-propagate] [--source-ip IP]"
        .into()
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        name: String::new(),
        env: String::new(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        next: None,
        next_host: String::new(),
        h2: false,
        show: "x-virtual-env".into(),
        propagate: vec!["x-virtual-env".into(), "baggage".into()],
        source_ip: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--h2" {
            a.h2 = true;
            continue;
        }
        if flag == "--no-propagate" {
            a.propagate.clear();
            continue;
        }
        let value = it.next().ok_or_else(usage)?;
        match flag.as_str() {
            "--name" => a.name = value,
            "--env" => a.env = value,
            "--listen" => a.listen = value.parse().map_err(|e| format!("--listen: {e}"))?,
            "--next" => a.next = Some(value.parse().map_err(|e| format!("--next: {e}"))?),
            "--next-host" => a.next_host = value,
            "--show" => a.show = value.to_ascii_lowercase(),
            "--source-ip" => {
                a.source_ip = Some(value.parse().map_err(|e| format!("--source-ip: {e}"))?)
            }
            "--propagate" => {
                a.propagate = value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_ascii_lowercase)
                    .collect()
            }
            _ => return Err(usage()),
        }
    }
    if a.name.is_empty() {
        return Err(usage());
    }
    Ok(a)
}

type Body = Full<Bytes>;

async fn call_next(
    args: &Args,
    next: SocketAddr,
    incoming: &Request<Incoming>,
) -> Result<String, String> {
    let stream = connect(next, args.source_ip)
        .await
        .map_err(|e| format!("connect {next}: {e}"))?;
    let io = TokioIo::new(stream);
    let mut req = Request::builder().uri(format!("http://{}/", args.next_host));
    if !args.h2 {
        req = req.header("host", &args.next_host);
    }
    for name in &args.propagate {
        for value in incoming.headers().get_all(name.as_str()) {
            req = req.header(name.as_str(), value);
        }
    }
    let req = req.body(Body::default()).map_err(|e| e.to_string())?;
    let resp = if args.h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::task::spawn_local(conn);
        send.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::task::spawn_local(conn);
        send.send_request(req).await.map_err(|e| e.to_string())?
    };
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).trim_end().to_string();
    if status.is_success() {
        Ok(text)
    } else {
        Err(format!(
            "{} from {}: {text}",
            status.as_u16(),
            args.next_host
        ))
    }
}

/// Connects to `next`, from `source` when given (any port).
async fn connect(next: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(ip) = source else {
        return TcpStream::connect(next).await;
    };
    let socket = match ip {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(next).await
}

async fn handle(args: Rc<Args>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let received = req
        .headers()
        .get(args.show.as_str())
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .unwrap_or("empty")
        .to_string();
    let own = format!("[{} @ {}] <-{}", args.name, args.env, received);
    let (status, body) = match args.next {
        None => (200, own),
        Some(next) => match call_next(&args, next, &req).await {
            Ok(inner) => (200, format!("{inner}, {own}")),
            Err(e) => (502, format!("{own} !! {e}")),
        },
    };
    let resp = Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .header("x-served-by", format!("{}@{}", args.name, args.env))
        .body(Body::new(Bytes::from(body + "\n")));
    Ok(resp.unwrap_or_else(|_| Response::new(Body::default())))
}

fn main() {
    let args = match parse_args() {
        Ok(a) => Rc::new(a),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = match TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("bind {}: {e}", args.listen);
                std::process::exit(1);
            }
        };
        // The harness waits for this line to know the port is open.
        if let Ok(addr) = listener.local_addr() {
            println!("listening {addr}");
        }
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let args = Rc::clone(&args);
            tokio::task::spawn_local(async move {
                let service = hyper::service::service_fn(move |req| handle(Rc::clone(&args), req));
                let _ = hyper_util::server::conn::auto::Builder::new(LocalExec)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// Runs h2 connection tasks on the thread-local set (the service is `!Send`).
#[derive(Clone, Copy)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: std::future::Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}
