/*
 * A static arm64 /init for `pkvm-sim kernel-check --lifecycle`.
 *
 * It drives /dev/kvm through the six steps whose EL2 memory the host compares with the
 * simulator, and stops before each dump: it prints `PKVM-STEP <name>` on the console and
 * blocks until the host writes a line back (the host sends it once `pmemsave` of the
 * carve-out has finished). Then the VM-limit step: VMs of one vCPU, each run once, are
 * created until the first refusal (or the cap), and `PKVM-RESULT vm_limit=...` says how many
 * ran and which call failed with which errno. It powers off at the end, so QEMU exits.
 *
 * Kernel command line knobs (read from /proc/cmdline):
 *   pkvm_vm_cap=N   stop the VM-limit loop after N VMs (default 300; 0 skips the step)
 *   pkvm_vm_keep=1  power off with the VM-limit VMs alive (no vm-limit-destroyed step):
 *                   7.x closes a VM by walking its whole IPA space 1 GiB at a time
 *                   (kvm_stage2_destroy), 2^22 steps with a 52-bit IPA, so closing 255
 *                   VMs takes longer under emulation than the rest of the run
 *
 * Every VM is a plain (non-protected) VM of the default type 0: in protected mode v6.12 gives
 * it the host's IPA limit (kvm_init_ipa_range), v6.1 40 bits. The first KVM_RUN of a vCPU is
 * what creates the VM at EL2 in v6.12 (kvm_arch_vcpu_run_pid_change -> pkvm_create_hyp_vm).
 * The guest code stores to an address outside its memory slot, so its first run ends in a
 * KVM_EXIT_MMIO.
 *
 * Build: aarch64-linux-gnu-gcc -static -O2 -o init init.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <linux/reboot.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_VCPUS 4
#define GUEST_MEM_BYTES 0x10000UL /* 64 KiB: a multiple of every page size */
#define MMIO_IPA 0x10000000UL     /* outside the memory slot: the store exits to the host */
#define DEFAULT_VM_CAP 300

struct vm {
	int fd;
	int nr_vcpus;
	int vcpu_fd[MAX_VCPUS];
	struct kvm_run *run[MAX_VCPUS];
	void *mem;
};

static int kvm_fd = -1;
static long run_mmap_bytes;

static void say(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fflush(stdout);
}

static void power_off(void)
{
	fflush(stdout);
	sync();
	reboot(LINUX_REBOOT_CMD_POWER_OFF);
	for (;;)
		pause();
}

static void die(const char *what)
{
	say("PKVM-ERROR %s errno=%d (%s)\n", what, errno, strerror(errno));
	power_off();
}

/* Print the marker, then wait for the host's line: the dump is taken in between. */
static void step(const char *name)
{
	char c;

	say("PKVM-STEP %s\n", name);
	do {
		if (read(0, &c, 1) != 1)
			die("read console");
	} while (c != '\n' && c != '\r');
	say("PKVM-ACK %s\n", name);
}

static void setup_console(void)
{
	int fd;

	mkdir("/dev", 0755);
	mkdir("/proc", 0755);
	mkdir("/sys", 0755);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	fd = open("/dev/console", O_RDWR);
	if (fd >= 0) {
		dup2(fd, 0);
		dup2(fd, 1);
		dup2(fd, 2);
		if (fd > 2)
			close(fd);
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
}

static long cmdline_number(const char *key, long fallback)
{
	char buf[4096], *at;
	ssize_t n;
	int fd = open("/proc/cmdline", O_RDONLY);

	if (fd < 0)
		return fallback;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return fallback;
	buf[n] = '\0';
	at = strstr(buf, key);
	if (!at || at[strlen(key)] != '=')
		return fallback;
	return strtol(at + strlen(key) + 1, NULL, 0);
}

/* movz x1, #(MMIO_IPA >> 16), lsl #16; str x0, [x1]; b . */
static const uint32_t guest_code[] = { 0xd2a00001 | ((MMIO_IPA >> 16) << 5), 0xf9000020,
				       0x14000000 };

/* KVM_CREATE_VM, its memory slot and `nr_vcpus` initialised vCPUs. 0, or the errno. */
static int vm_create(struct vm *vm, int nr_vcpus, const char **failed_call)
{
	struct kvm_userspace_memory_region region = { 0 };
	struct kvm_vcpu_init init;
	int i;

	memset(vm, 0, sizeof(*vm));
	vm->fd = -1;
	*failed_call = "KVM_CREATE_VM";
	vm->fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	if (vm->fd < 0)
		return errno;
	*failed_call = "mmap guest memory";
	vm->mem = mmap(NULL, GUEST_MEM_BYTES, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (vm->mem == MAP_FAILED) {
		vm->mem = NULL;
		return errno;
	}
	memcpy(vm->mem, guest_code, sizeof(guest_code));
	region.slot = 0;
	region.guest_phys_addr = 0;
	region.memory_size = GUEST_MEM_BYTES;
	region.userspace_addr = (uint64_t)(uintptr_t)vm->mem;
	*failed_call = "KVM_SET_USER_MEMORY_REGION";
	if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		return errno;
	*failed_call = "KVM_ARM_PREFERRED_TARGET";
	if (ioctl(vm->fd, KVM_ARM_PREFERRED_TARGET, &init) < 0)
		return errno;
	for (i = 0; i < nr_vcpus; i++) {
		*failed_call = "KVM_CREATE_VCPU";
		vm->vcpu_fd[i] = ioctl(vm->fd, KVM_CREATE_VCPU, i);
		if (vm->vcpu_fd[i] < 0)
			return errno;
		vm->nr_vcpus++;
		*failed_call = "mmap kvm_run";
		vm->run[i] = mmap(NULL, run_mmap_bytes, PROT_READ | PROT_WRITE, MAP_SHARED,
				  vm->vcpu_fd[i], 0);
		if (vm->run[i] == MAP_FAILED) {
			vm->run[i] = NULL;
			return errno;
		}
		*failed_call = "KVM_ARM_VCPU_INIT";
		if (ioctl(vm->vcpu_fd[i], KVM_ARM_VCPU_INIT, &init) < 0)
			return errno;
	}
	return 0;
}

/* The first KVM_RUN of every vCPU (PC starts at 0, the guest code). 0, or the errno. */
static int vm_run_once(struct vm *vm, const char **failed_call)
{
	int i;

	for (i = 0; i < vm->nr_vcpus; i++) {
		*failed_call = "KVM_RUN";
		if (ioctl(vm->vcpu_fd[i], KVM_RUN, 0) < 0)
			return errno;
		if (vm->run[i]->exit_reason != KVM_EXIT_MMIO)
			say("PKVM-NOTE vcpu %d exit_reason=%u\n", i, vm->run[i]->exit_reason);
	}
	return 0;
}

static void vm_destroy(struct vm *vm)
{
	int i;

	for (i = 0; i < vm->nr_vcpus; i++) {
		if (vm->run[i])
			munmap(vm->run[i], run_mmap_bytes);
		close(vm->vcpu_fd[i]);
	}
	if (vm->fd >= 0)
		close(vm->fd);
	if (vm->mem)
		munmap(vm->mem, GUEST_MEM_BYTES);
	memset(vm, 0, sizeof(*vm));
	vm->fd = -1;
}

static void vm_start(struct vm *vm, int nr_vcpus, const char *label)
{
	const char *call;
	int err = vm_create(vm, nr_vcpus, &call);

	if (!err)
		err = vm_run_once(vm, &call);
	if (err) {
		errno = err;
		say("PKVM-ERROR %s: %s failed\n", label, call);
		die(call);
	}
}

/* VMs of one vCPU, each run once and kept, until the first refusal or `cap` VMs. */
static void vm_limit(long cap, int keep)
{
	struct vm *vms = calloc(cap + 1, sizeof(*vms));
	const char *call = "";
	long ran = 0, i;
	int err = 0;

	if (!vms)
		die("calloc");
	for (ran = 0; ran < cap; ran++) {
		err = vm_create(&vms[ran], 1, &call);
		if (!err)
			err = vm_run_once(&vms[ran], &call);
		if (err)
			break;
	}
	if (err)
		say("PKVM-RESULT vm_limit=%ld failed_call=%s errno=%d\n", ran, call, err);
	else
		say("PKVM-RESULT vm_limit=none cap=%ld\n", cap);
	step("vm-limit");
	if (keep)
		return; /* power-off does not close them: no teardown at all */
	for (i = 0; i <= ran && i <= cap; i++)
		if (vms[i].fd > 0 || vms[i].nr_vcpus)
			vm_destroy(&vms[i]);
	free(vms);
	step("vm-limit-destroyed");
}

int main(void)
{
	struct vm vm1, vm2, vm3;
	struct rlimit files = { 8192, 8192 };
	long cap;

	setup_console();
	setrlimit(RLIMIT_NOFILE, &files);
	cap = cmdline_number("pkvm_vm_cap", DEFAULT_VM_CAP);
	kvm_fd = open("/dev/kvm", O_RDWR);
	if (kvm_fd < 0)
		die("open /dev/kvm");
	run_mmap_bytes = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_mmap_bytes <= 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	say("PKVM-INIT page_size=%ld vm_cap=%ld\n", sysconf(_SC_PAGESIZE), cap);

	step("boot");
	vm_start(&vm1, 1, "vm1");
	step("vm1-1vcpu");
	vm_destroy(&vm1);
	step("vm1-destroyed");
	vm_start(&vm2, 4, "vm2");
	step("vm2-4vcpus");
	vm_start(&vm3, 1, "vm3");
	step("vm2-and-vm3");
	vm_destroy(&vm2);
	vm_destroy(&vm3);
	step("all-destroyed");
	if (cap > 0)
		vm_limit(cap, cmdline_number("pkvm_vm_keep", 0) != 0);
	say("PKVM-DONE\n");
	power_off();
	return 0;
}
