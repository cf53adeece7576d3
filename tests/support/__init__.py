"""Real servers for the tests: php-fpm, the flup sample backend, redis-server."""
