//! The proxy-wasm glue: the only module that talks to the host. It exports
//! the proxy-wasm ABI (0.2.1) itself, implements [`Host`] on the raw host
//! calls and hands each callback to [`crate::glue`].
//!
//! Why not the Rust SDK: Envoy enters the VM once per exported callback per
//! stream (~2k instructions each), and the SDK exports all of them
//! (`proxy_on_context_create`, `proxy_on_response_body` per chunk,
//! `proxy_on_log`, `proxy_on_done`, `proxy_on_delete`, ...), boxes a context
//! per stream and keeps it in a map. envlane needs two callbacks per stream:
//! `proxy_on_request_headers` (the decision) and `proxy_on_response_headers`
//! (the debug header). Per stream nothing is allocated and nothing is kept,
//! unless the debug header is asked for.
//!
//! Every host call is made directly, and a status other than `OK` is only a
//! `false`/`None` (the SDK's wrappers panic on statuses they do not expect and
//! on header bytes that are not UTF-8; a panic aborts the VM).
//!
//! The state between callbacks (plugins by name, debug explanations) is
//! [`Plugins`], one per VM.

use std::cell::RefCell;

use crate::glue::{envoy_filter_state_args, Host, LifeSpan, Plugins};

const OK: u32 = 0;
const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
const MAP_REQUEST_HEADERS: u32 = 0;
const MAP_RESPONSE_HEADERS: u32 = 2;
const METRIC_COUNTER: u32 = 0;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message: *const u8, message_size: usize) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_get_property(
        path: *const u8,
        path_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path: *const u8,
        path_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_call_foreign_function(
        name: *const u8,
        name_size: usize,
        arguments: *const u8,
        arguments_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
}

/// Takes ownership of bytes the host returned. The host allocates them with
/// this module's `proxy_on_memory_allocate` (the SDK's: a boxed `[u8]` of
/// exactly `size` bytes), as the SDK's own wrappers assume.
fn owned(status: u32, data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if status != OK {
        return None;
    }
    if data.is_null() {
        return Some(Vec::new());
    }
    // SAFETY: see above; `data` is non-null and holds `size` bytes we own.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// A property path as the ABI wants it: parts separated by NUL bytes.
fn property_path(path: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.iter().map(|p| p.len() + 1).sum());
    for (i, part) in path.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(part.as_bytes());
    }
    out
}

/// The host as the proxy-wasm ABI offers it.
struct Wasm;

impl Host for Wasm {
    fn plugin_config(&self, size: usize) -> Option<Vec<u8>> {
        let (mut data, mut len) = (std::ptr::null_mut(), 0);
        // SAFETY: out-pointers to locals; see `owned`.
        let status = unsafe {
            proxy_get_buffer_bytes(BUFFER_PLUGIN_CONFIGURATION, 0, size, &mut data, &mut len)
        };
        owned(status, data, len)
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let path = property_path(path);
        let (mut data, mut len) = (std::ptr::null_mut(), 0);
        // SAFETY: `path` outlives the call; out-pointers to locals.
        let status = unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut len) };
        owned(status, data, len)
    }

    fn request_headers(&self) -> Option<Vec<u8>> {
        let (mut data, mut len) = (std::ptr::null_mut(), 0);
        // SAFETY: out-pointers to locals; see `owned`.
        let status =
            unsafe { proxy_get_header_map_pairs(MAP_REQUEST_HEADERS, &mut data, &mut len) };
        owned(status, data, len)
    }

    fn remove_request_header(&self, name: &str) -> bool {
        // SAFETY: `name` outlives the call.
        unsafe {
            proxy_remove_header_map_value(MAP_REQUEST_HEADERS, name.as_ptr(), name.len()) == OK
        }
    }

    fn set_request_header(&self, name: &str, value: &[u8]) -> bool {
        replace_header(MAP_REQUEST_HEADERS, name, value)
    }

    fn set_response_header(&self, name: &str, value: &[u8]) -> bool {
        replace_header(MAP_RESPONSE_HEADERS, name, value)
    }

    fn set_filter_state(&self, name: &str, value: &[u8]) -> bool {
        // SAFETY: both slices outlive the call.
        unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) == OK }
    }

    fn set_envoy_filter_state(&self, key: &str, value: &[u8], span: LifeSpan) -> bool {
        let name = "set_envoy_filter_state";
        let args = envoy_filter_state_args(key, value, span);
        let (mut data, mut len) = (std::ptr::null_mut(), 0);
        // SAFETY: `name` and `args` outlive the call; out-pointers to locals.
        let status = unsafe {
            proxy_call_foreign_function(
                name.as_ptr(),
                name.len(),
                args.as_ptr(),
                args.len(),
                &mut data,
                &mut len,
            )
        };
        let ok = status == OK;
        drop(owned(status, data, len));
        ok
    }

    fn clear_route_cache(&self) {
        let name = "clear_route_cache";
        let (mut data, mut len) = (std::ptr::null_mut(), 0);
        // SAFETY: `name` outlives the call; out-pointers to locals. Absent
        // (NotFound) on hosts without the function: nothing to clear.
        let status = unsafe {
            proxy_call_foreign_function(
                name.as_ptr(),
                name.len(),
                std::ptr::null(),
                0,
                &mut data,
                &mut len,
            )
        };
        drop(owned(status, data, len));
    }

    fn define_counter(&self, name: &str) -> Option<u32> {
        let mut id = 0;
        // SAFETY: `name` outlives the call; out-pointer to a local.
        let status =
            unsafe { proxy_define_metric(METRIC_COUNTER, name.as_ptr(), name.len(), &mut id) };
        (status == OK).then_some(id)
    }

    fn increment(&self, id: u32) {
        // SAFETY: plain values.
        let _ = unsafe { proxy_increment_metric(id, 1) };
    }

    fn shared_data(&self, key: &str) -> Option<Vec<u8>> {
        let (mut data, mut len, mut cas) = (std::ptr::null_mut(), 0, 0);
        // SAFETY: `key` outlives the call; out-pointers to locals.
        let status = unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut len, &mut cas)
        };
        owned(status, data, len)
    }

    fn set_shared_data(&self, key: &str, value: &[u8]) -> bool {
        // SAFETY: both slices outlive the call.
        unsafe {
            proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), 0) == OK
        }
    }
}

fn replace_header(map: u32, name: &str, value: &[u8]) -> bool {
    // SAFETY: both slices outlive the call.
    unsafe {
        proxy_replace_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len())
            == OK
    }
}

/// `log` records to the host's log; a failed log call is ignored.
struct HostLogger;

impl log::Log for HostLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = match record.level() {
            log::Level::Trace => 0,
            log::Level::Debug => 1,
            log::Level::Info => 2,
            log::Level::Warn => 3,
            log::Level::Error => 4,
        };
        let message = record.args().to_string();
        // SAFETY: `message` outlives the call.
        let _ = unsafe { proxy_log(level, message.as_ptr(), message.len()) };
    }

    fn flush(&self) {}
}

static LOGGER: HostLogger = HostLogger;

fn install_logger() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

thread_local! {
    /// The VM's state. Wasm runs one callback at a time; the `RefCell` is
    /// never borrowed across a callback into this module (from inside a host
    /// call the host calls only `proxy_on_memory_allocate`, which does not
    /// touch it).
    static VM: RefCell<Plugins> = RefCell::new(Plugins::default());
}

/// proxy-wasm ABI actions.
const ACTION_CONTINUE: u32 = 0;

#[cfg(target_os = "wasi")]
extern "C" {
    fn __wasm_call_ctors();
}

/// The VM's start (WASI reactor): static constructors, then the logger.
#[no_mangle]
pub extern "C" fn _initialize() {
    // SAFETY: called once by the host before any other export, as WASI
    // reactors require.
    #[cfg(target_os = "wasi")]
    unsafe {
        __wasm_call_ctors();
    }
    install_logger();
}

/// Tells the host which ABI this module speaks.
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// The host allocates the bytes it returns (headers, properties, config)
/// here; [`owned`] takes them back as a `Vec` of exactly `size` bytes.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut buf: Vec<u8> = Vec::with_capacity(size);
    let ptr = buf.as_mut_ptr();
    std::mem::forget(buf);
    ptr
}

/// A (new) config for the plugin of root context `_root_id`.
#[no_mangle]
pub extern "C" fn proxy_on_configure(_root_id: u32, size: usize) -> bool {
    VM.with(|vm| {
        vm.try_borrow_mut()
            .is_ok_and(|mut vm| vm.configure(&Wasm, size))
    })
}

/// The request headers of stream `context_id`: the routing decision.
#[no_mangle]
pub extern "C" fn proxy_on_request_headers(
    context_id: u32,
    _headers: usize,
    _end_of_stream: bool,
) -> u32 {
    if cfg!(feature = "bench-noop") {
        // The benchmarks' empty filter: what any Wasm filter with these
        // exports costs, none of envlane's work.
        return ACTION_CONTINUE;
    }
    VM.with(|vm| {
        if let Ok(mut vm) = vm.try_borrow_mut() {
            vm.on_request_headers(&Wasm, context_id);
        }
    });
    ACTION_CONTINUE
}

/// The response headers of stream `context_id`: the debug header, if asked.
#[no_mangle]
pub extern "C" fn proxy_on_response_headers(
    context_id: u32,
    _headers: usize,
    _end_of_stream: bool,
) -> u32 {
    VM.with(|vm| {
        if let Ok(mut vm) = vm.try_borrow_mut() {
            vm.on_response_headers(&Wasm, context_id);
        }
    });
    ACTION_CONTINUE
}
