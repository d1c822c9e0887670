//! A resumed training run equals an uninterrupted one bit for bit (same
//! machine, same thread count). Its own test binary: libtorch's generator
//! (dropout) and thread count are process-wide.

mod common;

use common::*;
use dig_model::trainer::Trainer;
use dig_model::DigModel;
use tch::Device;

#[test]
fn a_resumed_run_equals_an_uninterrupted_one_bit_for_bit() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let run = |steps: u64, resume: bool| {
        let model = DigModel::random(&tiny(), 3, Device::Cpu);
        let mut t = Trainer::new(model, vec![one_structure()], options(12)).unwrap();
        if resume {
            t.resume(dir.path()).unwrap();
        }
        while t.step < steps {
            t.train_step().unwrap();
            if t.step.is_multiple_of(3) {
                t.log_window();
            }
        }
        t
    };
    let whole = run(12, false);
    let first = run(6, false);
    first.save_checkpoint(dir.path(), 1.0).unwrap();
    drop(first);
    let resumed = run(12, true);
    assert_eq!(resumed.step, 12);
    assert_eq!(resumed.history, whole.history, "logged losses differ");
    let (a, b) = (weights(&whole), weights(&resumed));
    assert_eq!(a.len(), b.len());
    for ((ka, ta), (kb, tb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert!(ta.equal(tb), "{ka} differs after resuming");
    }
    // The weights did move: this compares two trained models, not two copies
    // of the initial one.
    let fresh = DigModel::random(&tiny(), 3, Device::Cpu).state_dict();
    let moved = a
        .iter()
        .zip(&fresh)
        .filter(|((_, x), (_, y))| !x.equal(y))
        .count();
    assert!(moved > 10, "only {moved} tensors changed in training");
}
