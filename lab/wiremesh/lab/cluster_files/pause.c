/* The lab cluster's pod sandbox ("pause") process: holds the pod's namespaces, reaps orphans,
 * exits at once on SIGTERM or SIGINT. Built statically into an image of its own by images.py. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int signo) { (void)signo; _exit(0); }

static void reap(int signo) {
    (void)signo;
    while (waitpid(-1, 0, WNOHANG) > 0) {
    }
}

int main(void) {
    signal(SIGTERM, quit);
    signal(SIGINT, quit);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
