// Shared by the build scripts of every crate whose binaries or tests link
// libtorch (`include!`d, so there is one copy of the logic).
//
// torch-sys tells the linker where libtorch is but not the loader, so a
// binary would need LD_LIBRARY_PATH at run time. We bake the directory in
// as an rpath instead. We also force `libtorch_cuda.so` to stay linked when
// present: with `--as-needed` the linker drops it (no symbol is referenced
// directly), and then `tch::Cuda::is_available()` reports false even on a
// GPU machine.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(root) = std::env::var("LIBTORCH") else {
        return;
    };
    let lib = std::path::Path::new(&root).join("lib");
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
