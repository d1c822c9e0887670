//! Tests for the native torch.save reader against fixtures written by PyTorch.

use std::io::Write;
use std::path::{Path, PathBuf};

use dig_model::checkpoint::read_torch_checkpoint;
use tch::{Kind, Tensor};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Writes a zip laid out like torch.save output holding the given pickle bytes.
fn write_fake_checkpoint(pickle: &[u8]) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".pth").tempfile().unwrap();
    let mut zip = zip::ZipWriter::new(file.reopen().unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(pickle).unwrap();
    zip.start_file("archive/byteorder", opts).unwrap();
    zip.write_all(b"little").unwrap();
    zip.finish().unwrap();
    file
}

#[test]
fn checkpoint_matches_safetensors_bit_for_bit_without_module_prefix() {
    let from_pth = read_torch_checkpoint(&data("checkpoint.pth")).unwrap();
    let mut from_st = Tensor::read_safetensors(data("model.safetensors")).unwrap();
    from_st.sort_by(|a, b| a.0.cmp(&b.0));

    let pth_keys: Vec<&str> = from_pth.iter().map(|(k, _)| k.as_str()).collect();
    let st_keys: Vec<&str> = from_st.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(pth_keys, st_keys);
    for ((key, a), (_, b)) in from_pth.iter().zip(&from_st) {
        assert_eq!(a.size(), b.size(), "{key}: shape");
        assert_eq!(a.kind(), b.kind(), "{key}: dtype");
        assert!(a.equal(b), "{key}: values differ");
    }
}

#[test]
fn non_zip_file_is_rejected_with_its_name() {
    let mut file = tempfile::Builder::new().suffix(".pth").tempfile().unwrap();
    file.write_all(b"this is not a checkpoint at all").unwrap();
    let err = read_torch_checkpoint(file.path()).unwrap_err().to_string();
    assert!(err.contains(&file.path().display().to_string()), "{err}");
    assert!(err.contains("not a PyTorch checkpoint"), "{err}");
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let path = data("does-not-exist.pth");
    let err = read_torch_checkpoint(&path).unwrap_err().to_string();
    assert!(err.contains("does-not-exist.pth"), "{err}");
}

#[test]
fn checkpoint_without_tensors_is_rejected() {
    // {"step": 7} at protocol 2.
    let file = write_fake_checkpoint(b"\x80\x02}q\x00X\x04\x00\x00\x00stepq\x01K\x07s.");
    let err = read_torch_checkpoint(file.path()).unwrap_err().to_string();
    assert!(err.contains(&file.path().display().to_string()), "{err}");
    assert!(err.contains("no tensors"), "{err}");
}

#[test]
fn unsupported_pickle_opcode_is_named() {
    // Protocol-0 STRING opcode ('S'), which torch.save never writes.
    let file = write_fake_checkpoint(b"\x80\x02S'x'\n.");
    let err = read_torch_checkpoint(file.path()).unwrap_err().to_string();
    assert!(err.contains(&file.path().display().to_string()), "{err}");
    assert!(err.contains("unsupported pickle opcode 0x53"), "{err}");
}

/// views.pth holds a flat dict (no state_dict) written by torch.save: `base` =
/// arange(12).reshape(3,4) and two views sharing its storage, plus tensors of
/// other dtypes and non-tensor entries (epoch, lr, name) that must be ignored.
#[test]
fn strided_and_offset_views_and_other_dtypes_are_rebuilt() {
    let tensors = read_torch_checkpoint(&data("views.pth")).unwrap();
    let keys: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "base",
            "bf16",
            "double",
            "half",
            "long_strided",
            "mask",
            "scalar",
            "slice",
            "transposed"
        ]
    );
    let get = |name: &str| &tensors.iter().find(|(k, _)| k == name).unwrap().1;
    let floats = |name: &str| {
        let t = get(name);
        assert!(t.is_contiguous(), "{name} should be contiguous");
        Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    };

    assert_eq!(get("base").size(), [3, 4]);
    assert_eq!(floats("base"), (0..12).map(f64::from).collect::<Vec<_>>());
    assert_eq!(get("transposed").size(), [4, 3]);
    assert_eq!(
        floats("transposed"),
        [0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]
    );
    assert_eq!(get("slice").size(), [2, 2]);
    assert_eq!(floats("slice"), [5., 6., 9., 10.]);

    assert_eq!(get("long_strided").kind(), Kind::Int64);
    assert_eq!(get("long_strided").size(), [2, 2]);
    assert_eq!(
        Vec::<i64>::try_from(get("long_strided").flatten(0, -1)).unwrap(),
        [0, 2, 3, 5]
    );
    assert_eq!(get("double").kind(), Kind::Double);
    assert_eq!(floats("double"), [1.5, -2.25]);
    assert_eq!(get("half").kind(), Kind::Half);
    assert_eq!(floats("half"), [0.5, -1.0, 2.0]);
    assert_eq!(get("bf16").kind(), Kind::BFloat16);
    assert_eq!(floats("bf16"), [1.0, -0.5]);
    assert_eq!(get("mask").kind(), Kind::Bool);
    assert_eq!(
        Vec::<bool>::try_from(get("mask")).unwrap(),
        [true, false, true]
    );
    assert_eq!(get("scalar").size(), Vec::<i64>::new());
    assert_eq!(get("scalar").double_value(&[]), 3.25);
}
