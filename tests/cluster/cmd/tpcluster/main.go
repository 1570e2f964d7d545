// Command tpcluster runs a real etcd and kube-apiserver on loopback for
// tidepool's end-to-end tests, the way controller-runtime's envtest starts
// them: RBAC authorization, an admin client certificate in system:masters,
// service-account issuer and signing keys, free ports, a temporary data
// directory.
//
//	tpcluster run --bin-dir DIR [--state-dir DIR] [--watch-stdin]
//
// When the API server answers /readyz it prints one line,
//
//	ready kubeconfig=<path> server=<url>
//
// and runs until SIGINT or SIGTERM (or, with --watch-stdin, until its
// standard input closes, so it never outlives the test process that started
// it). It then stops both servers and removes the state directory.
package main

import (
	"bufio"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 || os.Args[1] != "run" {
		fmt.Fprintln(os.Stderr, "usage: tpcluster run --bin-dir DIR [--state-dir DIR] [--watch-stdin] [--ready-timeout 90s]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	binDir := fs.String("bin-dir", "", "directory holding the etcd and kube-apiserver binaries (tests/cluster/build.sh prints it)")
	stateDir := fs.String("state-dir", "", "directory for certificates, data and logs (default: a new temporary directory, removed on exit)")
	watchStdin := fs.Bool("watch-stdin", false, "stop when standard input closes")
	readyTimeout := fs.Duration("ready-timeout", 90*time.Second, "how long to wait for the API server to become ready")
	_ = fs.Parse(os.Args[2:])
	if *binDir == "" {
		fatalf("--bin-dir is required: run tests/cluster/build.sh, which builds the binaries and prints their directory")
	}
	for _, b := range []string{"etcd", "kube-apiserver"} {
		if _, err := os.Stat(filepath.Join(*binDir, b)); err != nil {
			fatalf("%s is missing from %s: run tests/cluster/build.sh to build it (%v)", b, *binDir, err)
		}
	}
	dir := *stateDir
	if dir == "" {
		d, err := os.MkdirTemp("", "tidepool-cluster-")
		if err != nil {
			fatalf("creating a state directory failed: %v", err)
		}
		dir = d
	} else if err := os.MkdirAll(dir, 0o700); err != nil {
		fatalf("creating state directory %s failed: %v", dir, err)
	}

	c := &cluster{bin: *binDir, dir: dir}
	stop := make(chan os.Signal, 2)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	if *watchStdin {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			stop <- syscall.SIGTERM
		}()
	}

	err := c.start(*readyTimeout)
	if err != nil {
		c.stop()
		fatalf("%v", err)
	}
	fmt.Printf("ready kubeconfig=%s server=%s\n", c.kubeconfig, c.server)
	_ = os.Stdout.Sync()

	// Fail loudly if either server dies while we are up.
	died := make(chan string, 2)
	go func() { <-c.etcdDone; died <- "etcd" }()
	go func() { <-c.apiDone; died <- "kube-apiserver" }()
	select {
	case <-stop:
		c.stop()
		fmt.Println("stopped")
	case who := <-died:
		fmt.Fprintf(os.Stderr, "tpcluster: %s exited unexpectedly; its log follows\n", who)
		tail(filepath.Join(dir, who+".log"), os.Stderr)
		c.stop()
		os.Exit(1)
	}
}

type cluster struct {
	bin, dir          string
	etcd, apiserver   *exec.Cmd
	etcdDone, apiDone chan struct{} // closed when the process has exited
	kubeconfig        string
	server            string
	stopped           bool
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "tpcluster: "+format+"\n", args...)
	os.Exit(1)
}

// freePort asks the kernel for a free loopback port. Another process can
// take it before we bind it; start() retries on a clash.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (c *cluster) start(readyTimeout time.Duration) error {
	if err := c.writeCerts(); err != nil {
		return fmt.Errorf("writing certificates into %s failed: %w", c.dir, err)
	}
	var lastErr error
	for attempt := 1; attempt <= 3; attempt++ {
		lastErr = c.startOnce(readyTimeout)
		if lastErr == nil {
			return nil
		}
		var clash portClash
		if !errors.As(lastErr, &clash) {
			return lastErr
		}
		fmt.Fprintf(os.Stderr, "tpcluster: %v; retrying with other ports (attempt %d of 3)\n", lastErr, attempt)
		c.stop()
		c.stopped = false
	}
	return fmt.Errorf("%w; three attempts found no free port pair: free some loopback ports or stop other control planes (make cluster-down)", lastErr)
}

type portClash struct{ who, log string }

func (p portClash) Error() string {
	return fmt.Sprintf("%s could not bind its port (another process took it); see %s", p.who, p.log)
}

func (c *cluster) startOnce(readyTimeout time.Duration) error {
	etcdPort, err := freePort()
	if err != nil {
		return fmt.Errorf("finding a free loopback port failed: %w", err)
	}
	apiPort, err := freePort()
	if err != nil {
		return fmt.Errorf("finding a free loopback port failed: %w", err)
	}
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPort)
	etcdLog := filepath.Join(c.dir, "etcd.log")
	c.etcd = exec.Command(filepath.Join(c.bin, "etcd"),
		"--data-dir="+filepath.Join(c.dir, "etcd"),
		"--listen-client-urls="+etcdURL,
		"--advertise-client-urls="+etcdURL,
		"--listen-peer-urls=http://127.0.0.1:0",
		"--unsafe-no-fsync=true",
		"--log-level=warn",
	)
	if c.etcdDone, err = startLogged(c.etcd, etcdLog); err != nil {
		return fmt.Errorf("starting etcd failed: %w", err)
	}
	if err := waitHTTP(etcdURL+"/health", nil, 30*time.Second, c.etcdDone); err != nil {
		if logHas(etcdLog, "address already in use") {
			return portClash{"etcd", etcdLog}
		}
		return fmt.Errorf("etcd did not become healthy: %w; see %s", err, etcdLog)
	}

	c.server = fmt.Sprintf("https://127.0.0.1:%d", apiPort)
	apiLog := filepath.Join(c.dir, "kube-apiserver.log")
	p := func(f string) string { return filepath.Join(c.dir, f) }
	c.apiserver = exec.Command(filepath.Join(c.bin, "kube-apiserver"),
		"--etcd-servers="+etcdURL,
		"--cert-dir="+c.dir,
		"--tls-cert-file="+p("serving.crt"),
		"--tls-private-key-file="+p("serving.key"),
		"--client-ca-file="+p("ca.crt"),
		"--secure-port="+strconv.Itoa(apiPort),
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--service-cluster-ip-range=10.0.0.0/24",
		"--allow-privileged=true",
		"--disable-admission-plugins=ServiceAccount",
		"--authorization-mode=RBAC",
		"--service-account-issuer="+c.server+"/",
		"--service-account-key-file="+p("sa.pub"),
		"--service-account-signing-key-file="+p("sa.key"),
		"--v=0",
	)
	if c.apiDone, err = startLogged(c.apiserver, apiLog); err != nil {
		return fmt.Errorf("starting kube-apiserver failed: %w", err)
	}
	client, err := c.adminClient()
	if err != nil {
		return err
	}
	if err := waitHTTP(c.server+"/readyz", client, readyTimeout, c.apiDone); err != nil {
		if logHas(apiLog, "address already in use") {
			return portClash{"kube-apiserver", apiLog}
		}
		var b strings.Builder
		tail(apiLog, &b)
		return fmt.Errorf("kube-apiserver did not become ready within %s: %w; last lines of %s:\n%s", readyTimeout, err, apiLog, b.String())
	}
	// The default namespace appears shortly after /readyz on a fresh etcd.
	if err := waitHTTP(c.server+"/api/v1/namespaces/default", client, 30*time.Second, c.apiDone); err != nil {
		return fmt.Errorf("the default namespace did not appear: %w; see %s", err, apiLog)
	}
	c.kubeconfig = p("kubeconfig")
	return c.writeKubeconfig()
}

// startLogged starts cmd with its output in logPath and returns a channel
// that closes when it exits.
func startLogged(cmd *exec.Cmd, logPath string) (chan struct{}, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd.Stdout = f
	cmd.Stderr = f
	// Its own process group, so a Ctrl-C meant for tpcluster reaches it only
	// through our orderly stop.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, err
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		f.Close()
		close(done)
	}()
	return done, nil
}

func waitHTTP(url string, client *http.Client, timeout time.Duration, exited <-chan struct{}) error {
	if client == nil {
		client = &http.Client{Timeout: 2 * time.Second}
	}
	deadline := time.Now().Add(timeout)
	var last error = errors.New("no answer yet")
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return fmt.Errorf("the process exited (%v)", last)
		default:
		}
		resp, err := client.Get(url)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Errorf("%s answered %d: %s", url, resp.StatusCode, firstLine(string(body)))
		} else {
			last = err
		}
		time.Sleep(250 * time.Millisecond)
	}
	return last
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

func logHas(path, needle string) bool {
	b, _ := os.ReadFile(path)
	return strings.Contains(string(b), needle)
}

func tail(path string, w io.Writer) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	var lines []string
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 1<<20), 1<<20)
	for s.Scan() {
		lines = append(lines, s.Text())
		if len(lines) > 20 {
			lines = lines[1:]
		}
	}
	for _, l := range lines {
		fmt.Fprintln(w, l)
	}
}

// stop terminates the API server, then etcd (each SIGTERM, then SIGKILL after
// 10s), and removes the state directory.
func (c *cluster) stop() {
	if c.stopped {
		return
	}
	c.stopped = true
	procs := []struct {
		cmd  *exec.Cmd
		done chan struct{}
	}{{c.apiserver, c.apiDone}, {c.etcd, c.etcdDone}}
	for _, p := range procs {
		if p.cmd == nil || p.done == nil {
			continue
		}
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	}
	c.apiserver, c.etcd, c.apiDone, c.etcdDone = nil, nil, nil, nil
	_ = os.RemoveAll(c.dir)
}

func (c *cluster) adminClient() (*http.Client, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(c.dir, "admin.crt"), filepath.Join(c.dir, "admin.key"))
	if err != nil {
		return nil, fmt.Errorf("loading the admin certificate failed: %w", err)
	}
	caPEM, err := os.ReadFile(filepath.Join(c.dir, "ca.crt"))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	return &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool}},
	}, nil
}

func (c *cluster) writeKubeconfig() error {
	read := func(f string) string {
		b, _ := os.ReadFile(filepath.Join(c.dir, f))
		return b64(b)
	}
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: tidepool-local
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: admin
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: tidepool-local
  context: {cluster: tidepool-local, user: admin, namespace: default}
current-context: tidepool-local
`, c.server, read("ca.crt"), read("admin.crt"), read("admin.key"))
	return os.WriteFile(c.kubeconfig, []byte(cfg), 0o600)
}

// writeCerts makes a CA, a serving certificate for 127.0.0.1 and localhost,
// an admin client certificate in group system:masters, and the
// service-account signing key pair.
func (c *cluster) writeCerts() error {
	now := time.Now().Add(-time.Hour)
	caKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "tidepool-test-ca"},
		NotBefore:             now,
		NotAfter:              now.Add(7 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	caCert, _ := x509.ParseCertificate(caDER)
	if err := writePEM(c.path("ca.crt"), "CERTIFICATE", caDER); err != nil {
		return err
	}
	leaf := func(name string, serial int64, tmpl *x509.Certificate) error {
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return err
		}
		tmpl.SerialNumber = big.NewInt(serial)
		tmpl.NotBefore = now
		tmpl.NotAfter = now.Add(7 * 24 * time.Hour)
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		if err := writePEM(c.path(name+".crt"), "CERTIFICATE", der); err != nil {
			return err
		}
		return writePEM(c.path(name+".key"), "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key))
	}
	if err := leaf("serving", 2, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		DNSNames:    []string{"localhost"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.0.0.1")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}); err != nil {
		return err
	}
	if err := leaf("admin", 3, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "tidepool-admin", Organization: []string{"system:masters"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}); err != nil {
		return err
	}
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	if err := writePEM(c.path("sa.key"), "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(saKey)); err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return err
	}
	return writePEM(c.path("sa.pub"), "PUBLIC KEY", pub)
}

func (c *cluster) path(f string) string { return filepath.Join(c.dir, f) }

func writePEM(path, kind string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600)
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }
