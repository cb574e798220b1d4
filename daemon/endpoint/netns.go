package endpoint

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// MaxNetnsPath bounds a netns path: PATH_MAX (4096) with its NUL byte.
const MaxNetnsPath = 4095

// NetnsMsg is the one answer to a netns path that is not a network
// namespace, whatever it is instead (missing, a FIFO, a device, a
// directory, a symlink, another namespace type, too long, relative): the
// agent runs as root and must not tell its callers what exists where.
const NetnsMsg = "--netns must name a network namespace (a file under /run/netns or /proc/PID/ns/net)"

// notNetnsError is NetnsMsg; errors.Is(err, ErrNoNetns) holds. Why the
// path was refused stays in the value for the agent's own log.
type notNetnsError struct{ why string }

func (notNetnsError) Error() string        { return NetnsMsg }
func (notNetnsError) Is(target error) bool { return target == ErrNoNetns }
func (e notNetnsError) Reason() string     { return e.why }
func refuse(format string, args ...any) error {
	return notNetnsError{why: fmt.Sprintf(format, args...)}
}

// NetnsReason returns why openNetns refused a path ("" if err is not such
// a refusal), for the agent's log only: it must not reach the caller.
func NetnsReason(err error) string {
	var ne notNetnsError
	if errors.As(err, &ne) {
		return ne.why
	}
	return ""
}

// CheckNetnsPath checks a netns path without touching the file system:
// given, absolute, at most MaxNetnsPath bytes, no NUL byte.
func CheckNetnsPath(path string) error {
	switch {
	case path == "":
		return fmt.Errorf("%w: no netns path given; pass /run/netns/NAME or /proc/PID/ns/net", ErrNoNetns)
	case len(path) > MaxNetnsPath:
		return refuse("path of %d bytes, longer than %d", len(path), MaxNetnsPath)
	case !strings.HasPrefix(path, "/"):
		return refuse("relative path")
	case strings.IndexByte(path, 0) >= 0:
		return refuse("NUL byte in path")
	}
	return nil
}

// openNetns opens path as a network namespace handle (see the package
// doc): every refusal is NetnsMsg, wrapping ErrNoNetns.
func openNetns(path string) (netns.NsHandle, error) {
	if err := CheckNetnsPath(path); err != nil {
		return netns.None(), err
	}
	fd, err := openNsFile(path, unix.CLONE_NEWNET)
	if err != nil {
		return netns.None(), err
	}
	return netns.NsHandle(fd), nil
}

// openNsFile opens a namespace file of type nstype (CLONE_NEWNET, ...)
// without ever calling the open method of anything that is not a
// namespace:
//
//  1. open(path, O_PATH|O_NOFOLLOW): never blocks (FIFO), never reaches a
//     driver (device), does not follow a final symlink;
//  2. a final symlink is refused unless it is on procfs (the magic link
//     /proc/PID/ns/net, which O_NOFOLLOW cannot open: ELOOP); that one is
//     opened again with O_PATH, following it;
//  3. fstatfs: the file must be on nsfs (NSFS_MAGIC);
//  4. only then is it opened for real, O_RDONLY|O_NONBLOCK|O_NOCTTY, through
//     /proc/self/fd/N of the O_PATH descriptor, so that it is the very
//     file checked in 3 even if path was replaced meanwhile;
//  5. ioctl(NS_GET_NSTYPE) must return nstype.
func openNsFile(path string, nstype int) (int, error) {
	pfd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, refuse("open O_PATH|O_NOFOLLOW: %v", err)
	}
	defer func() { unix.Close(pfd) }()
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		return -1, refuse("fstat: %v", err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFLNK {
		if fs, err := fsType(pfd); err != nil || fs != unix.PROC_SUPER_MAGIC {
			return -1, refuse("a symlink (only symlinks on /proc are followed)")
		}
		fd, err := unix.Open(path, unix.O_PATH|unix.O_CLOEXEC, 0)
		if err != nil {
			return -1, refuse("open /proc magic link O_PATH: %v", err)
		}
		unix.Close(pfd)
		pfd = fd
		if err := unix.Fstat(pfd, &st); err != nil {
			return -1, refuse("fstat: %v", err)
		}
	}
	if fs, err := fsType(pfd); err != nil || fs != unix.NSFS_MAGIC {
		return -1, refuse("not on nsfs (file type %#o, fs %#x, %v)", st.Mode&unix.S_IFMT, fs, err)
	}
	fd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(pfd), unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, refuse("reopen through /proc/self/fd: %v", err)
	}
	var st2 unix.Stat_t
	if err := unix.Fstat(fd, &st2); err != nil || st2.Dev != st.Dev || st2.Ino != st.Ino {
		unix.Close(fd)
		return -1, refuse("reopened file is not the one checked (%v)", err)
	}
	t, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	if err != nil || t != nstype {
		unix.Close(fd)
		return -1, refuse("namespace type %#x, want %#x (%v)", t, nstype, err)
	}
	return fd, nil
}

func fsType(fd int) (int64, error) {
	var sf unix.Statfs_t
	if err := unix.Fstatfs(fd, &sf); err != nil {
		return 0, err
	}
	return int64(sf.Type), nil
}
