//! Incremental decoding: what a model keeps between steps when it
//! generates one token at a time (attention's key/value cache).

use kiln_core::{Backend, DType, Error, Result, Tensor};

/// One attention layer's cached keys and values: `[heads·n, capacity,
/// head width]` buffers, of which the first `len` positions are filled.
/// Each step writes its positions into them in place (a buffer is taken
/// out while it is written, and lost only if that write fails).
struct KvSlot<B: Backend> {
    keys: Option<Tensor<B>>,
    values: Option<Tensor<B>>,
    len: usize,
}

impl<B: Backend> KvSlot<B> {
    /// `src` written over positions `len..` of `buffer`, in place when
    /// nothing else holds the buffer (the previous step's views of it are
    /// gone by now); the whole buffer back.
    fn write(buffer: &mut Option<Tensor<B>>, len: usize, src: &Tensor<B>) -> Result<Tensor<B>> {
        let full = buffer.take().ok_or_else(|| {
            Error::invalid("decode: a failed step lost this attention cache (start a new state)")
        })?;
        let full = full.into_written(1, len, &src.detach())?;
        *buffer = Some(full.clone());
        Ok(full)
    }
}

/// The state of a generation in progress, for [`crate::Sequential::decode`]:
/// how many positions have been processed and each attention layer's
/// cached keys and values, so a new token costs one step over the cache
/// rather than a pass over the whole context.
///
/// ```
/// use kiln_nn::DecodeState;
/// let state = DecodeState::<kiln_cpu::CpuBackend>::new(64);
/// assert_eq!((state.position(), state.capacity()), (0, 64));
/// ```
pub struct DecodeState<B: Backend> {
    capacity: usize,
    position: usize,
    slots: Vec<KvSlot<B>>,
    next: usize,
}

impl<B: Backend> DecodeState<B> {
    /// An empty cache for up to `capacity` positions (the model's context
    /// length).
    pub fn new(capacity: usize) -> Self {
        DecodeState {
            capacity,
            position: 0,
            slots: Vec::new(),
            next: 0,
        }
    }

    /// Positions processed so far: where the next call starts.
    pub fn position(&self) -> usize {
        self.position
    }

    /// The most positions the cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets everything (the buffers are kept for reuse).
    pub fn reset(&mut self) {
        self.position = 0;
        self.next = 0;
        for s in &mut self.slots {
            s.len = 0;
        }
    }

    /// Checks that `t` more positions fit; called before a step.
    pub(crate) fn begin(&mut self, t: usize) -> Result<()> {
        if t == 0 || self.position + t > self.capacity {
            return Err(Error::invalid(format!(
                "decode: {t} new positions after {} do not fit the context of {} (reset the state, or crop the context)",
                self.position, self.capacity
            )));
        }
        self.next = 0;
        Ok(())
    }

    /// Ends a step of `t` positions.
    pub(crate) fn finish(&mut self, t: usize) {
        self.position += t;
        self.next = 0;
    }

    /// Appends `keys` and `values` (`[rows, t, width]`) to the next
    /// attention layer's cache and returns all its keys and values so far
    /// (`[rows, position + t, width]`).
    pub(crate) fn append(
        &mut self,
        keys: &Tensor<B>,
        values: &Tensor<B>,
    ) -> Result<(Tensor<B>, Tensor<B>)> {
        let &[rows, t, width] = keys.dims() else {
            return Err(Error::shape(
                "decode",
                format!("keys of shape {}", keys.shape()),
            ));
        };
        let i = self.next;
        self.next += 1;
        if i == self.slots.len() {
            let dims = [rows, self.capacity, width];
            let dtype: DType = keys.dtype();
            self.slots.push(KvSlot {
                keys: Some(Tensor::zeros(&dims, dtype, keys.backend())?),
                values: Some(Tensor::zeros(&dims, dtype, keys.backend())?),
                len: 0,
            });
        }
        let slot = &mut self.slots[i];
        if let Some(held) = &slot.keys {
            if held.dims() != [rows, self.capacity, width] || held.dtype() != keys.dtype() {
                return Err(Error::shape(
                    "decode",
                    format!(
                        "the cache holds {} {}, the step brings {} {} (a new batch size needs a new state)",
                        held.shape(),
                        held.dtype(),
                        keys.shape(),
                        keys.dtype()
                    ),
                ));
            }
        }
        if slot.len != self.position {
            return Err(Error::invalid(format!(
                "decode: attention cache {i} holds {} positions, the state {}",
                slot.len, self.position
            )));
        }
        let all_keys = KvSlot::write(&mut slot.keys, slot.len, keys)?;
        let all_values = KvSlot::write(&mut slot.values, slot.len, values)?;
        slot.len += t;
        Ok((
            all_keys.narrow(1, 0, slot.len)?,
            all_values.narrow(1, 0, slot.len)?,
        ))
    }
}
