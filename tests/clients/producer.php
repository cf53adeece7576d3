<?php
// A producer written the way a PHP service would write one, with the phpredis extension.
// Driven by tests/gateway/test_clients.py:
//
//     php producer.php <port> <password> < plan.json
//
// The plan names the payloads (base64, so any bytes travel) and the ids to use; the script
// pushes them with every producer command and prints one JSON object on stdout: for each
// step the PHP type and value phpredis returned, or the exception it threw, and the
// connection's last error.  The test checks those reply types and what php-fpm received.

declare(strict_types=1);

if ($argc !== 3) {
    fwrite(STDERR, "usage: php producer.php <port> <password> < plan.json\n");
    exit(2);
}
if (!extension_loaded('redis')) {
    fwrite(STDERR, "the phpredis extension is not loaded (apt-get install php-redis)\n");
    exit(2);
}
[, $port, $password] = $argv;
$plan = json_decode(stream_get_contents(STDIN), true, 512, JSON_THROW_ON_ERROR);
$bytes = static fn(string $b64): string => base64_decode($b64, true);

/** Run one client call; report what came back (PHP type and value) or what was thrown. */
function step(Redis $redis, callable $call): array
{
    $redis->clearLastError();
    try {
        $value = $call();
        $result = ['type' => gettype($value), 'value' => $value];
    } catch (RedisException $e) {
        $result = ['exception' => get_class($e), 'message' => $e->getMessage()];
    }
    // phpredis 5 keeps the C string's terminating NUL in getLastError() (it does so
    // against a real redis-server too); it is not part of the server's message.
    $error = $redis->getLastError();
    $result['last_error'] = $error === null ? null : rtrim($error, "\0");
    return $result;
}

function connect(int $port): Redis
{
    $redis = new Redis();
    $redis->connect('127.0.0.1', $port, 5.0);
    $redis->setOption(Redis::OPT_READ_TIMEOUT, 10.0);
    return $redis;
}

$out = [];

// Redis-6 form: AUTH <user> <password>, the user being the queue.
$redis = connect((int)$port);
$out['noauth_lpush'] = step($redis, fn() => $redis->lPush('orders', 'refused'));
$out['auth_wrong'] = step($redis, fn() => $redis->auth(['orders', 'not-' . $password]));
$out['auth_array'] = step($redis, fn() => $redis->auth(['orders', $password]));
$out['ping'] = step($redis, fn() => $redis->ping());
$out['ping_message'] = step($redis, fn() => $redis->ping('hello'));
$out['lpush'] = step($redis, fn() => $redis->lPush('orders', ...array_map($bytes, $plan['lpush'])));
$out['rpush'] = step($redis, fn() => $redis->rPush('orders', ...array_map($bytes, $plan['rpush'])));
$out['zadd'] = step(
    $redis,
    fn() => $redis->zAdd('orders', $plan['zadd']['at'], $bytes($plan['zadd']['payload']))
);
$xadd = $plan['xadd'];
$fields = ['payload' => $bytes($xadd['payload']), 'priority' => $xadd['priority']]
    + $xadd['attributes'];
$out['xadd'] = step($redis, fn() => $redis->xAdd('orders', $xadd['id'], $fields));
// Same id again while the first copy is delayed (still pending): acknowledged, not stored twice.
$again = $plan['xadd_delayed'];
$delayed = ['payload' => $bytes($again['payload']), 'delay' => (string)$again['delay_ms']];
$out['xadd_delayed'] = step($redis, fn() => $redis->xAdd('orders', $again['id'], $delayed));
$out['xadd_delayed_again'] = step($redis, fn() => $redis->xAdd('orders', $again['id'], $delayed));
$out['llen'] = step($redis, fn() => $redis->lLen('orders'));
// An error reply is one command's failure: the connection carries on.
$out['unknown_queue'] = step($redis, fn() => $redis->lPush('nowhere', 'lost'));
$out['ping_after_error'] = step($redis, fn() => $redis->ping());
$out['llen_after_error'] = step($redis, fn() => $redis->lLen('orders'));
$redis->close();

// Password-only form: AUTH <password> opens every queue with that password.
$redis = connect((int)$port);
$out['auth_password'] = step($redis, fn() => $redis->auth($password));
$out['password_rpush'] = step(
    $redis,
    fn() => $redis->rPush('orders', $bytes($plan['password_only']))
);
$redis->close();

echo json_encode($out, JSON_THROW_ON_ERROR | JSON_INVALID_UTF8_SUBSTITUTE), "\n";
