//! Issue 11: no allocation per request on the hot paths -- a reverse or echo request that
//! arrives whole, and a keep-alive GET answered from the HTTP response cache. A counting
//! allocator counts what this thread allocates while the requests are served (after a few
//! warm-up requests have sized the buffers); the output goes to /dev/null through the same
//! `Outbox::flush` the models use.

use socklab::output::Outbox;
use socklab::service::http::{cache::Cache, path, Http, HttpConfig};
use socklab::service::{ServiceConfig, ServiceKind};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is passed to the system allocator unchanged; the counting touches only
// const-initialised thread-locals without destructors, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.with(Cell::get) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        if ARMED.with(Cell::get) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Allocations made by `f` on this thread.
fn allocations(f: impl FnOnce()) -> usize {
    COUNT.with(|c| c.set(0));
    ARMED.with(|a| a.set(true));
    f();
    ARMED.with(|a| a.set(false));
    COUNT.with(Cell::get)
}

#[test]
fn reverse_and_echo_requests_allocate_nothing() {
    let sink = std::fs::File::create("/dev/null").unwrap();
    for kind in [ServiceKind::Reverse, ServiceKind::Echo] {
        let service = ServiceConfig::new(kind);
        let mut out = service.outbox();
        let mut session = service.open(&mut out);
        let mut batch = Vec::new();
        for _ in 0..8 {
            batch.extend_from_slice(&64u32.to_be_bytes());
            batch.extend_from_slice(&[7u8; 64]);
        }
        let mut serve = |n: usize| {
            for _ in 0..n {
                session.receive(&batch, &mut out).unwrap();
                out.flush(&sink).unwrap();
            }
        };
        serve(4);
        assert_eq!(allocations(|| serve(1000)), 0, "{kind:?}");
    }
}

#[test]
fn a_cached_http_get_allocates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f.txt"), vec![b'x'; 1024]).unwrap();
    // The cache takes a file once its last change is a second old.
    std::thread::sleep(Duration::from_millis(1100));
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let config = Arc::new(HttpConfig {
        root_fd: path::open_root(&root).unwrap(),
        root,
        follow_symlinks: false,
        header_timeout: Duration::from_secs(10),
        cache: Cache::new(1 << 20),
    });
    let sink = std::fs::File::create("/dev/null").unwrap();
    let mut out = Outbox::new();
    let mut http = Http::new(config.clone());
    let one = b"GET /f.txt HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n";
    let mut serve = |n: usize| {
        for _ in 0..n {
            http.receive(one, &mut out);
            out.flush(&sink).unwrap();
        }
    };
    serve(4);
    assert_eq!(config.cache.usage().0, 1, "the file is cached");
    assert_eq!(allocations(|| serve(1000)), 0);
}
