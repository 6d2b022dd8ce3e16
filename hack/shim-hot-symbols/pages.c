/* pages FILE: the indexes of FILE's pages that are in the page cache (mincore), one a line.
 * make-list.py uses it to see which pages of the shim any process touched. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
int main(int argc, char **argv) {
  if (argc != 2) { fprintf(stderr, "usage: pages FILE\n"); return 2; }
  int fd = open(argv[1], O_RDONLY);
  struct stat st;
  if (fd < 0 || fstat(fd, &st)) { perror(argv[1]); return 1; }
  long pg = sysconf(_SC_PAGESIZE), n = (st.st_size + pg - 1) / pg;
  void *m = mmap(0, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
  unsigned char *v = malloc(n);
  if (m == MAP_FAILED || mincore(m, st.st_size, v)) { perror("mincore"); return 1; }
  for (long i = 0; i < n; i++) if (v[i] & 1) printf("%ld\n", i);
  return 0;
}
