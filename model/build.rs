include!("./torch_rpath.rs");
