// Runs the KV-cache kernels of csrc/kv_cache.cu on the host (cuda_host/cuda_runtime.h emulates each
// launch thread by thread) and checks every byte they leave against a plain loop written from the
// contract in kv_cache.h. Built by tests/test_kv_cache_host_emulation.py with AddressSanitizer and
// UBSan: every buffer is its own exact-size allocation, so one byte written or read past any tensor
// aborts the run. Cases (split-append with and without q): bf16/fp16-sized and fp32-sized elements, head dims from 8 to 256, host,
// device and mixed offsets, misaligned pointers (the 8-, 4- and 2-byte chunk paths), overflow at
// either end, empty inputs, the size limit, and the launch geometry.
//
// Prints "kv_cache host emulation: N cases passed" and exits 0, or names the first failing case.

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

#include "../../csrc/kv_cache.cu"

namespace {

uint64_t rng_state = 0x9E3779B97F4A7C15ull;
uint8_t next_byte() {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return uint8_t(rng_state >> 24);
}

// One exact-size heap block per tensor, `shift` bytes past a 16-byte-aligned start so that the
// pointer's alignment is chosen, and the tensor's last byte is the allocation's last byte. The
// `shift` bytes in front belong to the allocation (ASan cannot see a write there): they hold a
// sentinel that prefix_intact() checks.
struct Buffer {
  uint8_t* block = nullptr;
  uint8_t* data = nullptr;
  size_t bytes = 0;
  size_t shift = 0;
  bool prefix_intact() const {
    for (size_t i = 0; i < shift; ++i)
      if (block[i] != 0x5A) return false;
    return true;
  }
  Buffer(size_t n, size_t shift_, bool random) : bytes(n), shift(shift_) {
    block = static_cast<uint8_t*>(aligned_alloc(16, ((n + shift + 15) / 16) * 16));
    // aligned_alloc rounds up to 16: hand ASan an exact block instead when the size is odd.
    if ((n + shift) % 16 != 0) {
      free(block);
      block = static_cast<uint8_t*>(malloc(n + shift));  // glibc malloc: 16-byte aligned
    }
    data = block + shift;
    for (size_t i = 0; i < shift; ++i) block[i] = 0x5A;
    for (size_t i = 0; i < n; ++i) data[i] = random ? next_byte() : uint8_t(0xA5);
  }
  ~Buffer() { free(block); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// The "device" offset (absent when the case has none) and the status flag, each in its own block.
struct Position {
  Buffer offset_buf{sizeof(int64_t), 0, false}, status_buf{sizeof(int32_t), 0, false};
  int64_t* offset = nullptr;
  int32_t* status = reinterpret_cast<int32_t*>(status_buf.data);
  explicit Position(const int64_t* offset_dev_value) {
    if (offset_dev_value) {
      offset = reinterpret_cast<int64_t*>(offset_buf.data);
      *offset = *offset_dev_value;
    }
    *status = 0;
    emulated_launches.clear();
  }
};

int cases = 0;
std::string failure;

bool check(bool ok, const std::string& what) {
  if (!ok && failure.empty()) failure = what;
  return ok;
}

std::string describe(const char* op, int64_t a, int64_t b, int64_t n, int64_t cap, int64_t hb, int64_t off_host,
                     const int64_t* off_dev, size_t shift) {
  char s[256];
  snprintf(s, sizeof s, "%s(%lld, %lld, n=%lld, capacity=%lld, head_bytes=%lld, offset_host=%lld, offset_dev=%s%lld, shift=%zu)",
           op, (long long)a, (long long)b, (long long)n, (long long)cap, (long long)hb, (long long)off_host,
           off_dev ? "" : "none/", off_dev ? (long long)*off_dev : 0ll, shift);
  return s;
}

// The launch geometry: enough threads for every chunk, no block beyond the last chunk, y = copies.
bool geometry_ok(int64_t chunks, unsigned grid_y) {
  if (emulated_launches.size() != 1) return false;
  const EmulatedLaunch& l = emulated_launches[0];
  const int64_t per_block = int64_t(l.threads) * kIlp;
  return l.grid.y == grid_y && l.grid.z == 1 && l.threads == kThreads && int64_t(l.grid.x) * per_block >= chunks &&
         int64_t(l.grid.x - 1) * per_block < chunks;
}

// The chunk width the launcher must pick: the widest of 16, 8, 4, 2 dividing head_bytes and the shift.
int64_t expected_width(int64_t head_bytes, size_t shift) {
  for (int64_t w = 16; w > 2; w /= 2)
    if (head_bytes % w == 0 && shift % w == 0) return w;
  return 2;
}

void append_case(int64_t rows, int64_t n, int64_t capacity, int64_t head_bytes, int64_t offset_host,
                 const int64_t* offset_dev_value, size_t shift) {
  ++cases;
  const std::string what = describe("append", rows, 0, n, capacity, head_bytes, offset_host, offset_dev_value, shift);
  Buffer k(rows * n * head_bytes, shift, true), v(rows * n * head_bytes, shift, true);
  Buffer kc(rows * capacity * head_bytes, shift, false), vc(rows * capacity * head_bytes, shift, false);
  Position where(offset_dev_value);
  int64_t* offset = where.offset;
  int32_t* status = where.status;
  const char* err = ard_kv_append_launch(kc.data, vc.data, k.data, v.data, offset, offset_host, status, rows, n,
                                         capacity, head_bytes, 0, 0);
  if (!check(err == nullptr, what + ": launcher returned " + (err ? err : ""))) return;
  if (rows * n == 0) {
    check(emulated_launches.empty(), what + ": empty input launched a kernel");
  } else {
    check(geometry_ok(rows * n * head_bytes / expected_width(head_bytes, shift), 2), what + ": launch geometry");
  }
  const int64_t pos = offset_host + (offset_dev_value ? *offset_dev_value : 0);
  const bool fits = pos >= 0 && pos + n <= capacity;
  check(*status == (fits || rows * n == 0 ? 0 : 1), what + ": status " + std::to_string(*status));
  check(kc.prefix_intact() && vc.prefix_intact(), what + ": wrote in front of a cache");
  for (int which = 0; which < 2; ++which) {
    const Buffer& src = which == 0 ? k : v;
    const Buffer& dst = which == 0 ? kc : vc;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t t = 0; t < capacity; ++t) {
        const uint8_t* got = dst.data + (r * capacity + t) * head_bytes;
        const bool written = fits && t >= pos && t < pos + n;
        for (int64_t c = 0; c < head_bytes; ++c) {
          const uint8_t want = written ? src.data[(r * n + (t - pos)) * head_bytes + c] : uint8_t(0xA5);
          if (got[c] != want) {  // the message is built only for a mismatch: this loop runs per byte
            check(false, what + ": " + (which ? "v" : "k") + "_cache row " + std::to_string(r) + " token " +
                             std::to_string(t) + " byte " + std::to_string(c));
            return;
          }
        }
      }
  }
}

// with_q false: q is nullptr (only k and v appended; the launch visits 2 of each row's 3 parts).
void split_case_impl(int64_t batch, int64_t heads, int64_t n, int64_t capacity, int64_t head_bytes,
                     int64_t offset_host, const int64_t* offset_dev_value, size_t shift, bool with_q) {
  ++cases;
  const std::string what = describe(with_q ? "split_append" : "split_append without q", batch, heads, n, capacity,
                                    head_bytes, offset_host, offset_dev_value, shift);
  Buffer qkv(batch * n * 3 * heads * head_bytes, shift, true), q(batch * heads * n * head_bytes, shift, false);
  Buffer kc(batch * heads * capacity * head_bytes, shift, false), vc(batch * heads * capacity * head_bytes, shift, false);
  Position where(offset_dev_value);
  int64_t* offset = where.offset;
  int32_t* status = where.status;
  const char* err = ard_qkv_split_append_launch(qkv.data, with_q ? q.data : nullptr, kc.data, vc.data, offset,
                                                offset_host, status, batch, n, heads, capacity, head_bytes, 0, 0);
  if (!check(err == nullptr, what + ": launcher returned " + (err ? err : ""))) return;
  const int64_t tokens = batch * n * heads;
  if (tokens == 0) {
    check(emulated_launches.empty(), what + ": empty input launched a kernel");
  } else {
    check(geometry_ok((with_q ? 3 : 2) * tokens * head_bytes / expected_width(head_bytes, shift), 1),
          what + ": launch geometry");
  }
  const int64_t pos = offset_host + (offset_dev_value ? *offset_dev_value : 0);
  const bool fits = pos >= 0 && pos + n <= capacity;
  check(*status == (fits || tokens == 0 ? 0 : 1), what + ": status " + std::to_string(*status));
  check(q.prefix_intact() && kc.prefix_intact() && vc.prefix_intact(), what + ": wrote in front of q or a cache");
  // qkv is (batch, n, 3, heads, head_bytes); q is written whether or not the cache fits.
  auto qkv_at = [&](int64_t b, int64_t t, int64_t s, int64_t h) {
    return qkv.data + (((b * n + t) * 3 + s) * heads + h) * head_bytes;
  };
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t t = 0; t < n; ++t) {
        const uint8_t* got = q.data + ((b * heads + h) * n + t) * head_bytes;
        bool ok = true;
        if (with_q) {
          ok = memcmp(got, qkv_at(b, t, 0, h), head_bytes) == 0;
        } else {  // untouched
          for (int64_t c = 0; c < head_bytes && ok; ++c) ok = got[c] == uint8_t(0xA5);
        }
        if (!ok) {
          check(false, what + ": q b" + std::to_string(b) + " h" + std::to_string(h) + " t" + std::to_string(t));
          return;
        }
      }
      for (int s = 1; s < 3; ++s) {
        const Buffer& dst = s == 1 ? kc : vc;
        for (int64_t t = 0; t < capacity; ++t) {
          const uint8_t* got = dst.data + ((b * heads + h) * capacity + t) * head_bytes;
          const bool written = fits && t >= pos && t < pos + n;
          for (int64_t c = 0; c < head_bytes; ++c) {
            const uint8_t want = written ? qkv_at(b, t - pos, s, h)[c] : uint8_t(0xA5);
            if (got[c] != want) {
              check(false, what + ": " + (s == 1 ? "k" : "v") + "_cache b" + std::to_string(b) + " h" +
                               std::to_string(h) + " token " + std::to_string(t) + " byte " + std::to_string(c));
              return;
            }
          }
        }
      }
    }
}

void split_case(int64_t batch, int64_t heads, int64_t n, int64_t capacity, int64_t head_bytes, int64_t offset_host,
                const int64_t* offset_dev_value, size_t shift) {
  split_case_impl(batch, heads, n, capacity, head_bytes, offset_host, offset_dev_value, shift, true);
  if (failure.empty())
    split_case_impl(batch, heads, n, capacity, head_bytes, offset_host, offset_dev_value, shift, false);
}

}  // namespace

int main() {
  // Element sizes 2 (bf16, fp16) and 4 (fp32); D a multiple of 8, so head_bytes a multiple of 16.
  const int64_t head_dims[] = {8, 16, 24, 72, 80, 128, 256};
  for (int64_t elem : {2, 4})
    for (int64_t d : head_dims) {
      const int64_t hb = d * elem;
      const int64_t dev2 = 2, dev0 = 0, dev_neg = -1, dev_far = 1000;
      // host offset, device offset, both (host part + device part), the first and last slots
      append_case(6, 7, 20, hb, 5, nullptr, 0);
      append_case(6, 7, 20, hb, 0, &dev2, 0);
      append_case(3, 4, 12, hb, 3, &dev2, 0);
      append_case(2, 5, 5, hb, 0, &dev0, 0);
      append_case(4, 3, 9, hb, 6, nullptr, 0);
      split_case(2, 3, 7, 20, hb, 5, nullptr, 0);
      split_case(2, 3, 7, 20, hb, 0, &dev2, 0);
      split_case(3, 2, 1, 4, hb, 1, &dev2, 0);
      split_case(1, 4, 6, 6, hb, 0, &dev0, 0);
      // misaligned pointers: 8-, 4- and 2-byte chunks
      for (size_t shift : {8, 4, 2}) {
        append_case(3, 5, 11, hb, 2, &dev2, shift);
        split_case(2, 3, 5, 11, hb, 2, &dev2, shift);
      }
      // overflow: before the start, past the end (device offset), one token past (host offset)
      append_case(3, 4, 12, hb, 0, &dev_neg, 0);
      append_case(3, 4, 12, hb, 0, &dev_far, 0);
      append_case(3, 4, 12, hb, 9, nullptr, 0);
      split_case(2, 3, 4, 12, hb, 0, &dev_neg, 0);
      split_case(2, 3, 4, 12, hb, 5, &dev_far, 0);
      split_case(2, 3, 4, 12, hb, 9, nullptr, 0);
      // empty inputs launch nothing
      append_case(0, 4, 12, hb, 0, nullptr, 0);
      append_case(3, 0, 12, hb, 0, nullptr, 0);
      split_case(0, 3, 4, 12, hb, 0, nullptr, 0);
      split_case(2, 3, 0, 12, hb, 0, nullptr, 0);
      if (!failure.empty()) break;
    }
  // An ARD-sized step (DiT-XL/2 heads, 256-token blocks, 4 blocks of capacity): many blocks per grid.
  const int64_t dev_block = 512;
  if (failure.empty()) append_case(2 * 16, 256, 1024, 72 * 2, 0, &dev_block, 0);
  if (failure.empty()) split_case(2, 16, 256, 1024, 72 * 2, 256, &dev_block, 0);
  // Past the 32-bit index range the launchers refuse before touching anything (no buffers needed).
  if (failure.empty()) {
    ++cases;
    emulated_launches.clear();
    const char* err = ard_kv_append_launch(nullptr, nullptr, nullptr, nullptr, nullptr, 0, nullptr, int64_t(1) << 20,
                                           4096, 8192, 16 * 128, 0, 0);
    check(err != nullptr && strstr(err, "2^31") != nullptr && emulated_launches.empty(), "append size limit");
    ++cases;
    err = ard_qkv_split_append_launch(nullptr, nullptr, nullptr, nullptr, nullptr, 0, nullptr, 1 << 12, 4096, 64,
                                      8192, 16 * 128, 0, 0);
    check(err != nullptr && strstr(err, "2^31") != nullptr && emulated_launches.empty(), "split size limit");
  }
  if (!failure.empty()) {
    printf("kv_cache host emulation: FAILED at case %d: %s\n", cases, failure.c_str());
    return 1;
  }
  printf("kv_cache host emulation: %d cases passed\n", cases);
  return 0;
}
