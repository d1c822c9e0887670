include!("../model/torch_rpath.rs");
