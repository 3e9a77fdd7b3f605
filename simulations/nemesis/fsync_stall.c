/* Preloaded into a vaultnode by the nemesis (simulations/nemesis/cluster.py): while the file
 * named by $NEMESIS_DISK_STALL_FILE exists, every fsync and fdatasync waits, as on a disk that
 * stops completing writes; once the file is removed they complete normally. Nothing else in
 * the process is touched. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static void wait_while_stalled(void) {
    const char *flag = getenv("NEMESIS_DISK_STALL_FILE");
    struct timespec pause = {0, 10 * 1000 * 1000};
    while (flag != NULL && access(flag, F_OK) == 0) {
        nanosleep(&pause, NULL);
    }
}

int fsync(int fd) {
    static int (*real_fsync)(int);
    if (real_fsync == NULL) {
        real_fsync = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    }
    wait_while_stalled();
    return real_fsync(fd);
}

int fdatasync(int fd) {
    static int (*real_fdatasync)(int);
    if (real_fdatasync == NULL) {
        real_fdatasync = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    }
    wait_while_stalled();
    return real_fdatasync(fd);
}
