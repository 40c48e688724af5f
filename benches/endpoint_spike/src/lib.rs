//! Endpoint-mode spike: per request pick one address of the plugin config
//! (round robin over a per-VM counter), write it to filter state
//! `envoy.network.transport_socket.original_dst_address` with the foreign
//! function `set_envoy_filter_state`, write `wasm.envlane_route` = the
//! ORIGINAL_DST cluster's name, clear the route cache. Config (plain text,
//! one item a line): `cluster=NAME`, `addr=IP:PORT` (repeated),
//! `span=N` (the proto's LifeSpan: 0 FilterChain, 1 DownstreamRequest).
//! The statuses of the host calls go to a response header `x-spike` so the
//! spike script can read them.

use std::cell::RefCell;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message: *const u8, message_size: usize) -> u32;
    fn proxy_get_buffer_bytes(t: u32, start: usize, max: usize, d: *mut *mut u8, s: *mut usize) -> u32;
    fn proxy_set_property(p: *const u8, ps: usize, v: *const u8, vs: usize) -> u32;
    fn proxy_replace_header_map_value(m: u32, k: *const u8, ks: usize, v: *const u8, vs: usize) -> u32;
    fn proxy_call_foreign_function(
        n: *const u8,
        ns: usize,
        a: *const u8,
        as_: usize,
        d: *mut *mut u8,
        s: *mut usize,
    ) -> u32;
}

#[derive(Default)]
struct State {
    cluster: String,
    addrs: Vec<String>,
    span: u64,
    next: usize,
    last: String,
}

thread_local! { static S: RefCell<State> = RefCell::new(State::default()); }

fn log(msg: &str) {
    unsafe { proxy_log(2, msg.as_ptr(), msg.len()) };
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// envoy.source.extensions.common.wasm.SetEnvoyFilterStateArguments:
/// 1 path (string), 2 value (string), 3 span (enum LifeSpan).
fn args(path: &str, value: &str, span: u64) -> Vec<u8> {
    let mut b = Vec::new();
    for (tag, s) in [(0x0a, path), (0x12, value)] {
        b.push(tag);
        varint(&mut b, s.len() as u64);
        b.extend_from_slice(s.as_bytes());
    }
    if span != 0 {
        b.push(0x18);
        varint(&mut b, span);
    }
    b
}

fn foreign(name: &str, arg: &[u8]) -> u32 {
    let (mut d, mut s) = (std::ptr::null_mut(), 0usize);
    unsafe { proxy_call_foreign_function(name.as_ptr(), name.len(), arg.as_ptr(), arg.len(), &mut d, &mut s) }
}

#[no_mangle]
pub extern "C" fn _initialize() {}
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut b: Vec<u8> = Vec::with_capacity(size);
    let p = b.as_mut_ptr();
    std::mem::forget(b);
    p
}
#[no_mangle]
pub extern "C" fn proxy_on_context_create(_c: u32, _p: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_configure(_root: u32, size: usize) -> bool {
    let (mut d, mut s) = (std::ptr::null_mut(), 0usize);
    if unsafe { proxy_get_buffer_bytes(7, 0, size, &mut d, &mut s) } != 0 || d.is_null() {
        return false;
    }
    let bytes = unsafe { Vec::from_raw_parts(d, s, s) };
    let text = String::from_utf8_lossy(&bytes).into_owned();
    S.with(|st| {
        let mut st = st.borrow_mut();
        st.addrs.clear();
        for line in text.split(['\n', ';']) {
            match line.trim().split_once('=') {
                Some(("cluster", v)) => st.cluster = v.to_string(),
                Some(("addr", v)) => st.addrs.push(v.to_string()),
                Some(("span", v)) => st.span = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        log(&format!("endpoint-spike: cluster={} addrs={:?} span={}", st.cluster, st.addrs, st.span));
    });
    true
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(_c: u32, _h: usize, _e: bool) -> u32 {
    S.with(|st| {
        let mut st = st.borrow_mut();
        if st.addrs.is_empty() {
            st.last = "no-addrs".into();
            return;
        }
        let addr = st.addrs[st.next % st.addrs.len()].clone();
        st.next += 1;
        let a = foreign(
            "set_envoy_filter_state",
            &args("envoy.network.transport_socket.original_dst_address", &addr, st.span),
        );
        let key = "envlane_route";
        let b = unsafe { proxy_set_property(key.as_ptr(), key.len(), st.cluster.as_ptr(), st.cluster.len()) };
        let c = foreign("clear_route_cache", &[]);
        st.last = format!("addr={addr} set_envoy_filter_state={a} set_property={b} clear_route_cache={c}");
    });
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(_c: u32, _h: usize, _e: bool) -> u32 {
    S.with(|st| {
        let st = st.borrow();
        let k = "x-spike";
        unsafe { proxy_replace_header_map_value(2, k.as_ptr(), k.len(), st.last.as_ptr(), st.last.len()) };
    });
    0
}
