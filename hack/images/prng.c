/* prng SEED BYTES: writes BYTES of deterministic pseudo-random data (splitmix64) to stdout.
 * The `large` image needs a layer that gzip cannot shrink, built the same way every time and
 * quickly: this runs at disk speed, where /dev/urandom is neither reproducible nor fast. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: prng SEED BYTES\n");
    return 2;
  }
  uint64_t x = strtoull(argv[1], NULL, 0);
  unsigned long long left = strtoull(argv[2], NULL, 0);
  static uint64_t buf[1 << 13];
  while (left > 0) {
    for (size_t i = 0; i < sizeof buf / sizeof buf[0]; i++) {
      uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
      buf[i] = z ^ (z >> 31);
    }
    size_t n = left < sizeof buf ? (size_t)left : sizeof buf;
    if (fwrite(buf, 1, n, stdout) != n) {
      perror("prng: write");
      return 1;
    }
    left -= n;
  }
  return fflush(stdout) == 0 ? 0 : 1;
}
