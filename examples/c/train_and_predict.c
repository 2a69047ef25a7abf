/*
 * kiln from C: build the seed's MLP, train it on an IDX dataset, evaluate
 * it, save it, load it back and classify images from a caller-owned float
 * buffer; then show that bad calls come back as errors, not crashes.
 *
 *   cc examples/c/train_and_predict.c -Icrates/kiln-capi/include \
 *      target/release/libkiln_capi.a -lpthread -ldl -lm -o train_and_predict
 *   ./train_and_predict data/mnist-sample [THREADS] [EPOCHS]
 *
 * Exits 0 when every step did what it should.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kiln.h"

/* Stops with kiln's message when a call that should work fails. */
#define CHECK(call)                                                          \
  do {                                                                       \
    KilnStatus s_ = (call);                                                  \
    if (s_ != KILN_STATUS_OK) {                                              \
      fprintf(stderr, "%s:%d: %s failed (%d): %s\n", __FILE__, __LINE__,     \
              #call, (int)s_, kiln_last_error());                            \
      exit(1);                                                               \
    }                                                                        \
  } while (0)

/* A call that must fail with `want`, leaving a message. */
static int expect(KilnStatus got, KilnStatus want, const char *what) {
  if (got != want || kiln_last_error()[0] == '\0') {
    fprintf(stderr, "%s: expected status %d, got %d\n", what, (int)want, (int)got);
    return 1;
  }
  printf("  refused as expected: %s: %s\n", what, kiln_last_error());
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s IDX_DIR [THREADS] [EPOCHS]\n", argv[0]);
    return 2;
  }
  const char *dir = argv[1];
  size_t threads = argc > 2 ? (size_t)strtoul(argv[2], NULL, 10) : 0;
  uint32_t epochs = argc > 3 ? (uint32_t)strtoul(argv[3], NULL, 10) : 1;
  printf("kiln %s\n", kiln_version());

  KilnBackend *backend = NULL;
  CHECK(kiln_backend_new(NULL, threads, &backend));
  printf("backend: %s\n", kiln_backend_name(backend));

  KilnDataset *train = NULL, *test = NULL;
  CHECK(kiln_dataset_load_idx(dir, KILN_SPLIT_TRAIN, &train));
  CHECK(kiln_dataset_load_idx(dir, KILN_SPLIT_TEST, &test));
  size_t n_train = 0, n_test = 0;
  CHECK(kiln_dataset_len(train, &n_train));
  CHECK(kiln_dataset_len(test, &n_test));
  printf("data: %zu train, %zu test examples from %s\n", n_train, n_test, dir);

  KilnModel *model = NULL;
  CHECK(kiln_model_new(backend, "mlp", 42, &model));
  size_t input_len = 0, classes = 0;
  CHECK(kiln_model_sizes(model, &input_len, &classes));

  KilnFitOptions opts = kiln_fit_options_default();
  opts.epochs = epochs;
  opts.batch_size = 64;
  KilnFitResult fit;
  CHECK(kiln_model_fit(model, train, &opts, &fit));
  printf("trained %u epoch(s) in %.2f s: loss %.4f, accuracy %.2f%%\n", fit.epochs,
         fit.seconds, fit.loss, 100.0 * fit.accuracy);

  KilnEvaluation ev;
  CHECK(kiln_model_evaluate(model, test, 0, &ev));
  printf("test: loss %.4f, accuracy %.2f%% over %llu examples\n", ev.loss,
         100.0 * ev.accuracy, (unsigned long long)ev.examples);
  int failures = 0;
  if (!(ev.accuracy > 0.5)) {
    fprintf(stderr, "test accuracy %.3f: the model did not learn\n", ev.accuracy);
    failures++;
  }

  /* Save, free, and load it back: the loaded model must agree. */
  const char *path = "kiln-c-example.safetensors";
  CHECK(kiln_model_save(model, path));
  KilnModel *loaded = NULL;
  CHECK(kiln_model_load(backend, path, &loaded));
  remove(path);

  /* Three synthetic images in the caller's own buffer: pixels in [0, 1]. */
  size_t n = 3;
  float *images = malloc(n * input_len * sizeof(float));
  float *probs = malloc(n * classes * sizeof(float));
  float *again = malloc(n * classes * sizeof(float));
  if (!images || !probs || !again) return 1;
  for (size_t i = 0; i < n * input_len; i++) images[i] = (float)((i * 7919) % 256) / 255.0f;
  CHECK(kiln_model_predict(model, images, n * input_len, n, probs, n * classes));
  CHECK(kiln_model_predict(loaded, images, n * input_len, n, again, n * classes));
  for (size_t i = 0; i < n; i++) {
    double sum = 0;
    size_t best = 0;
    for (size_t c = 0; c < classes; c++) {
      sum += probs[i * classes + c];
      if (probs[i * classes + c] > probs[i * classes + best]) best = c;
    }
    printf("image %zu: class %zu (p = %.3f), probabilities sum to %.6f\n", i, best,
           probs[i * classes + best], sum);
    if (fabs(sum - 1.0) > 1e-5) failures++;
  }
  if (memcmp(probs, again, n * classes * sizeof(float)) != 0) {
    fprintf(stderr, "the saved and loaded model disagree\n");
    failures++;
  }

  /* Bad calls: each a status and a message, never a crash. */
  printf("errors:\n");
  failures += expect(kiln_model_predict(model, NULL, 0, 1, probs, classes),
                     KILN_STATUS_NULL_POINTER, "a NULL input");
  failures += expect(kiln_model_predict(model, images, n * input_len - 1, n, probs, n * classes),
                     KILN_STATUS_SIZE, "an input one float short");
  failures += expect(kiln_model_predict(model, images, n * input_len, n, probs, n * classes - 1),
                     KILN_STATUS_SIZE, "an output one float short");
  failures += expect(kiln_model_predict(model, (const float *)((const char *)images + 1),
                                        input_len, 1, probs, classes),
                     KILN_STATUS_MISALIGNED, "a misaligned input");
  failures += expect(kiln_model_predict((const KilnModel *)train, images, input_len, 1,
                                        probs, classes),
                     KILN_STATUS_BAD_HANDLE, "a dataset passed as a model");
  failures += expect(kiln_model_new(backend, "no-such-model", 1, &loaded),
                     KILN_STATUS_INVALID, "an unknown model");
  failures += expect(kiln_model_load(backend, "/no/such/model.safetensors", &loaded),
                     KILN_STATUS_IO, "a missing model file");
  failures += expect(kiln_backend_new("sse9", 0, &backend), KILN_STATUS_INVALID,
                     "an unknown kernel set");
  KilnFitOptions zero = opts;
  zero.epochs = 0;
  failures += expect(kiln_model_fit(model, train, &zero, NULL), KILN_STATUS_INVALID,
                     "zero epochs");

  free(images);
  free(probs);
  free(again);
  kiln_model_free(loaded);
  kiln_model_free(model);
  kiln_dataset_free(train);
  kiln_dataset_free(test);
  kiln_backend_free(backend);
  kiln_model_free(NULL); /* freeing NULL is allowed */
  if (failures) {
    fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  printf("ok\n");
  return 0;
}
