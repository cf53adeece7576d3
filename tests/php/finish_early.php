<?php
// Answers at once, then works on for 1.5 s in the same php-fpm child, as a Symfony or
// Laravel front controller does after fastcgi_finish_request() (its terminate listeners).
echo 'answered';
fastcgi_finish_request();
usleep(1500000);
