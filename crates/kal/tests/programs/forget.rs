// A Rust program that forgets a Box and keeps another in a static.
use std::sync::Mutex;
static KEEP: Mutex<Vec<Box<[u8; 64]>>> = Mutex::new(Vec::new());
fn main() {
    let b = Box::new([7u8; 1000]); // @forget
    std::hint::black_box(&b); // keep the optimizer from removing the allocation
    std::mem::forget(b);
    KEEP.lock().unwrap().push(Box::new([1u8; 64]));
}
