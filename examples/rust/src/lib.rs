//! Runnable examples of kiln's Rust API; the code is in the `*.rs` files
//! beside this folder (`cargo run -p kiln-examples --example NAME`):
//!
//! - `tensors`: tensors and ops on a chosen CPU kernel set;
//! - `custom_loop`: a training loop written by hand with autograd and an
//!   optimiser, including gradients handed to the optimiser directly;
//! - `train_mlp`: the seed's MLP built in code and trained with the
//!   `Trainer` on the bundled MNIST sample;
//! - `load_and_predict`: a saved model loaded back and used to classify.
//!
//! A custom `Backend` is `examples/vendor-backend`, run through the
//! conformance suite.
