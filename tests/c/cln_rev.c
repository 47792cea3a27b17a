/* A reverse client written from the course's cln_rev listing, to prove wire
 * compatibility: one connection, one request per file argument, each sent with
 * writev(length in network byte order, contents) and answered with recv(MSG_WAITALL).
 * Usage: cln_rev HOST PORT FILE... */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

int main(int argc, char *argv[]) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s host port file...\n", argv[0]);
        return 2;
    }
    struct addrinfo hints, *res, *ai;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(argv[1], argv[2], &hints, &res) != 0) {
        perror("getaddrinfo");
        return 1;
    }
    int s = -1;
    for (ai = res; ai; ai = ai->ai_next) {
        s = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (s < 0) continue;
        if (connect(s, ai->ai_addr, ai->ai_addrlen) == 0) break;
        close(s);
        s = -1;
    }
    freeaddrinfo(res);
    if (s < 0) {
        perror("connect");
        return 1;
    }
    for (int i = 3; i < argc; i++) {
        int f = open(argv[i], O_RDONLY);
        struct stat st;
        if (f < 0 || fstat(f, &st) < 0) {
            perror(argv[i]);
            return 1;
        }
        size_t size = (size_t)st.st_size;
        char *buf = malloc(size ? size : 1);
        size_t have = 0;
        while (have < size) {
            ssize_t n = read(f, buf + have, size - have);
            if (n <= 0) { perror("read"); return 1; }
            have += (size_t)n;
        }
        close(f);
        uint32_t len_net = htonl((uint32_t)size);
        struct iovec iov[2] = {{&len_net, sizeof len_net}, {buf, size}};
        size_t total = sizeof len_net + size, sent = 0;
        while (sent < total) { /* writev may be short: resume where it stopped */
            ssize_t n = writev(s, iov, 2);
            if (n < 0) { perror("writev"); return 1; }
            sent += (size_t)n;
            for (int k = 0; k < 2; k++) {
                size_t take = (size_t)n < iov[k].iov_len ? (size_t)n : iov[k].iov_len;
                iov[k].iov_base = (char *)iov[k].iov_base + take;
                iov[k].iov_len -= take;
                n -= (ssize_t)take;
            }
        }
        if (size > 0 && recv(s, buf, size, MSG_WAITALL) != (ssize_t)size) {
            perror("recv");
            return 1;
        }
        if (write(1, buf, size) != (ssize_t)size) return 1;
        free(buf);
    }
    close(s);
    return 0;
}
