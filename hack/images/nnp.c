/* nnp: installed setuid root in the `layers` image (as in kubernetes'
 * test/images/nonewprivs). Prints the effective uid, so a test can tell whether
 * no_new_privs (or a nosuid mount) kept the setuid bit from taking effect. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
  printf("Effective uid: %d\n", (int)geteuid());
  return 0;
}
